//! GGUF, llama.cpp's single-file model format: a header of typed metadata (architecture,
//! shapes, the tokenizer's vocabulary and merges, the chat template), a table of tensors, and
//! their data, aligned, often block-quantised. It is shared by two readers that must not know
//! each other: `model::hf` takes the tensors and the shape metadata, `data::TextTokenizer`
//! the `tokenizer.*` keys.
//!
//! Layout (GGUF v2 and v3; v1 used 32-bit counts and is refused):
//! `"GGUF"`, version u32, tensor count u64, metadata count u64, then each metadata entry
//! (key string, value type u32, value), then each tensor's name, dimension count u32,
//! dimensions u64 (innermost first, ggml's `ne` order), ggml type u32 and offset u64 into
//! the data section, which starts at the next multiple of `general.alignment` (default 32).
//! Strings are a u64 length and UTF-8 bytes; everything is little-endian.
//!
//! The file is memory-mapped: a tensor's bytes are read only when it is dequantised.

pub mod quant;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
pub use quant::GgmlType;

/// `"GGUF"` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// More entries than this in a header means a corrupt count, not a model (the largest
/// vocabularies have ~260k tokens).
const MAX_COUNT: u64 = 1 << 24;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is an integer ≥ 0 of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            Value::F32(v) => v.into(),
            Value::F64(v) => v,
            Value::I8(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::I64(v) => v as f64,
            _ => self.as_u64()? as f64,
        })
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor is and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Dimensions in ggml's order: `dims[0]` is the innermost (contiguous) one, so a PyTorch
    /// `[out, in]` weight is stored as `[in, out]`.
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Offset of the first byte from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in row-major (PyTorch) order: `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// Tensor name → info, in file order of names.
    pub tensors: BTreeMap<String, TensorInfo>,
    bytes: Mmap,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GgufFile({}, v{}, {} tensors)",
            self.path.display(),
            self.version,
            self.tensors.len()
        )
    }
}

/// Whether `path` looks like a GGUF file: a file whose first four bytes are the magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
        && u32::from_le_bytes(magic) == MAGIC
}

impl GgufFile {
    /// Opens and checks `path`: the header parses, every tensor's type is known and its bytes
    /// lie inside the file (a truncated download is refused here, not while loading).
    pub fn open(path: &Path) -> Result<Self> {
        let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map kept alive with `GgufFile`; as with safetensors, a model file is
        // not rewritten while it is being loaded.
        let bytes = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::pretrained(path, reason);
        let mut r = Cursor { bytes: &bytes, at: 0 };
        let magic = r.u32().map_err(|e| bad(e.0))?;
        if magic != MAGIC {
            return Err(bad("not a GGUF file (its first bytes are not `GGUF`)".into()));
        }
        let version = r.u32().map_err(|e| bad(e.0))?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let header = (|| -> std::result::Result<_, Truncated> {
            let n_tensors = r.count("tensor count")?;
            let n_meta = r.count("metadata count")?;
            let mut metadata = BTreeMap::new();
            for _ in 0..n_meta {
                let key = r.string()?;
                let kind = r.u32()?;
                let value = r.value(kind, 0)?;
                metadata.insert(key, value);
            }
            let mut infos = Vec::with_capacity(n_tensors as usize);
            for _ in 0..n_tensors {
                let name = r.string()?;
                let n_dims = r.u32()?;
                if n_dims == 0 || n_dims > 4 {
                    return Err(Truncated(format!(
                        "tensor `{name}` has {n_dims} dimensions (1 to 4 expected)"
                    )));
                }
                let dims = (0..n_dims)
                    .map(|_| r.u64())
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let kind = r.u32()?;
                let offset = r.u64()?;
                infos.push((name, dims, kind, offset));
            }
            Ok((metadata, infos))
        })()
        .map_err(|e| bad(e.0))?;
        let (metadata, infos) = header;
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| bad(format!("general.alignment = {v:?} is not a power of two")))?,
        };
        let data_start = (r.at as u64).div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, kind, offset) in infos {
            let kind = GgmlType::from_id(kind).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has ggml type {kind}, which this reader does not dequantise (supported: {})",
                    GgmlType::names()
                ))
            })?;
            let info = TensorInfo { dims, kind, offset };
            let size = kind.bytes_for(info.elements()).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}`: {} elements is not a whole number of {kind:?} blocks ({} each)",
                    info.elements(),
                    kind.block()
                ))
            })?;
            let end = data_start.checked_add(offset).and_then(|s| s.checked_add(size));
            if offset % alignment != 0 || end.is_none_or(|e| e > bytes.len() as u64) {
                return Err(bad(format!(
                    "tensor `{name}` ({size} bytes at offset {offset}) lies outside the file ({} bytes): truncated \
                        download?",
                    bytes.len()
                )));
            }
            if tensors.insert(name.clone(), info).is_some() {
                return Err(bad(format!("tensor `{name}` is listed twice")));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            bytes,
            data_start: data_start as usize,
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required metadata value, or an error naming the key.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| Error::pretrained(&self.path, format!("metadata `{key}` is missing")))
    }

    /// A metadata value that must be a non-negative integer.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| {
            Error::pretrained(
                &self.path,
                format!("metadata `{key}` = {v:?} is not an unsigned integer"),
            )
        })
    }

    /// The raw bytes of tensor `name`.
    pub fn raw(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        let info = self.tensors.get(name)?;
        let start = self.data_start + info.offset as usize;
        let size = info.kind.bytes_for(info.elements()).expect("checked at open") as usize;
        Some((info, &self.bytes[start..start + size]))
    }

    /// Tensor `name` dequantised to f32, row-major in [`TensorInfo::shape`] order.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let (info, raw) = self
            .raw(name)
            .ok_or_else(|| Error::pretrained(&self.path, format!("tensor `{name}` is missing")))?;
        Ok(quant::dequantize(info.kind, raw))
    }
}

/// A header read past the end of the file (or a corrupt field), with what was being read.
struct Truncated(String);

/// Reads little-endian fields from the start of the file.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<&[u8], Truncated> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            Truncated(format!(
                "header ends early at byte {} of {}: truncated file?",
                self.at,
                self.bytes.len()
            ))
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], Truncated> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> std::result::Result<u32, Truncated> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, Truncated> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn count(&mut self, what: &str) -> std::result::Result<u64, Truncated> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(Truncated(format!("{what} {n} is implausible: corrupt header?")));
        }
        Ok(n)
    }

    fn string(&mut self) -> std::result::Result<String, Truncated> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| Truncated(format!("string length {n} is implausible")))?;
        let at = self.at;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Truncated(format!("string at byte {at} is not UTF-8")))
    }

    /// A value of GGUF value type `kind`; arrays nest at most a few levels.
    fn value(&mut self, kind: u32, depth: usize) -> std::result::Result<Value, Truncated> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(match self.array::<1>()?[0] {
                0 => false,
                1 => true,
                b => {
                    return Err(Truncated(format!(
                        "boolean byte {b} at {} is neither 0 nor 1",
                        self.at - 1
                    )))
                }
            }),
            8 => Value::String(self.string()?),
            9 if depth < 4 => {
                let item = self.u32()?;
                let n = self.count("array length")?;
                let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(Truncated(format!(
                    "metadata value type {other} at byte {} is unknown",
                    self.at - 4
                )))
            }
        })
    }
}
