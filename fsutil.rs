//! File helpers shared by every module: atomic writes, so no reader ever sees half a file.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// Writes `bytes` to a temporary sibling of `path`, syncs it, and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] for content written in pieces (through a buffer), so that a large file
/// is never assembled in memory first.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{unique}", std::process::id()));
    let result = (|| {
        let mut f = std::io::BufWriter::new(fs::File::create(&tmp)?);
        write(&mut f)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_atomic(path, json.as_bytes())
}

/// Reads and parses a JSON file, naming the file and the problem on failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A value whose NaNs JSON wrote as `null` (serde_json has no NaN): the shape with `Option`
/// in place of every float, read back with `None` as NaN.
pub trait Nullable: Sized {
    type Raw: serde::de::DeserializeOwned;
    fn from_raw(raw: Self::Raw) -> Self;
}

impl Nullable for f64 {
    type Raw = Option<f64>;
    fn from_raw(raw: Option<f64>) -> f64 {
        raw.unwrap_or(f64::NAN)
    }
}

impl<T: Nullable> Nullable for Vec<T> {
    type Raw = Vec<T::Raw>;
    fn from_raw(raw: Self::Raw) -> Self {
        raw.into_iter().map(T::from_raw).collect()
    }
}

/// Only for containers (`Option<Vec<f64>>`): `null` is `None`, a `null` inside is NaN.
impl<T: Nullable> Nullable for Option<Vec<T>> {
    type Raw = Option<Vec<T::Raw>>;
    fn from_raw(raw: Self::Raw) -> Self {
        raw.map(Vec::from_raw)
    }
}

/// `#[serde(deserialize_with = "crate::fsutil::nan")]` on a float field (or a vector of them)
/// that may be NaN, so that what `write_json` wrote reads back: a measure that is undefined for
/// a run (tokens to solve with nothing solved) must not make its whole file unreadable.
pub fn nan<'de, D: serde::Deserializer<'de>, T: Nullable>(d: D) -> std::result::Result<T, D::Error> {
    use serde::Deserialize;
    T::Raw::deserialize(d).map(T::from_raw)
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    struct Measures {
        #[serde(deserialize_with = "super::nan")]
        x: f64,
        #[serde(deserialize_with = "super::nan")]
        curve: Vec<Vec<f64>>,
        #[serde(deserialize_with = "super::nan")]
        optimal: Option<Vec<f64>>,
    }

    #[test]
    fn nan_written_as_null_reads_back_as_nan() {
        let m = Measures {
            x: f64::NAN,
            curve: vec![vec![0.5, f64::NAN]],
            optimal: Some(vec![f64::NAN, 1.0]),
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(text, r#"{"x":null,"curve":[[0.5,null]],"optimal":[null,1.0]}"#);
        let back: Measures = serde_json::from_str(&text).unwrap();
        assert!(back.x.is_nan() && back.curve[0][0] == 0.5 && back.curve[0][1].is_nan());
        assert!(back.optimal.as_ref().unwrap()[0].is_nan());
        let none: Measures = serde_json::from_str(r#"{"x":2.0,"curve":[],"optimal":null}"#).unwrap();
        assert!(none.x == 2.0 && none.optimal.is_none());
    }
}
