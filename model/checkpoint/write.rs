//! Writing checkpoints: to a file, atomically, or to bytes in memory (to send to another
//! process), each section serialised once, straight into its destination.

use std::fs;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::record::Record;

use super::{write_record, Header, LoraHeader, SectionInfo, ADAPTERS_SECTION, FORMAT_VERSION, MAGIC, MODEL_SECTION};
use crate::error::{Error, Result};
use crate::fsutil::write_atomic_with;
use crate::model::lora::BaseRef;
use crate::model::Transformer;

/// A section of a checkpoint, written by a function straight into the file: a module's record
/// is never held as bytes.
pub struct Section<'a> {
    pub name: String,
    write: Box<dyn FnOnce(&mut dyn Write) -> Result<()> + 'a>,
}

impl<'a> Section<'a> {
    /// Bytes already in memory.
    pub fn bytes(name: &str, bytes: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            write: Box::new(move |w| {
                w.write_all(&bytes)
                    .map_err(|e| Error::checkpoint("<memory>", e.to_string()))
            }),
        }
    }

    /// A module's record (cheap to make: it shares the module's tensors).
    pub fn record<B: Backend, R: Record<B> + 'a>(name: &str, record: R) -> Self {
        Self {
            name: name.into(),
            write: Box::new(move |w| write_record::<B, R>(record, w)),
        }
    }
}

/// Passes writes on to the file, counting and checksumming them. Keeps the file's own error
/// (a full disk, say), which the record serialiser would report only as a failed write.
struct Measured<'w> {
    file: &'w mut dyn Write,
    len: u64,
    crc: crc32fast::Hasher,
    error: Option<std::io::Error>,
}

impl Write for Measured<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self
            .file
            .write(buf)
            .inspect_err(|e| self.error = Some(std::io::Error::new(e.kind(), e.to_string())))?;
        self.len += n as u64;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes a checkpoint atomically: the model plus any extra sections and metadata.
///
/// Each section is serialised once, straight into the file, so the peak is the live state plus
/// one section's record (for a pretrained model, gigabytes less than assembling the file in
/// memory; BENCHMARKS.md). The header, which names every section's length and checksum, comes
/// first in the file: room for it is reserved (its JSON with the widest possible numbers), and
/// it is written there, padded with spaces, once the sections are known.
pub fn save<B: Backend>(
    path: &Path,
    model: &Transformer<B>,
    extra_sections: Vec<Section>,
    meta: serde_json::Value,
) -> Result<()> {
    let lora = lora_header(model, |base| stored_base_path(base, path));
    let mut failure = None;
    let result = write_atomic_with(path, |f| write_to(f, model, lora, extra_sections, meta, &mut failure));
    match failure {
        Some(e) => Err(e),
        None => result,
    }
}

/// The bytes [`save`] writes, in memory (to send a checkpoint to another process); a LoRA base
/// is named by the path the model holds.
pub fn to_bytes<B: Backend>(
    model: &Transformer<B>,
    extra_sections: Vec<Section>,
    meta: serde_json::Value,
) -> Result<Vec<u8>> {
    let lora = lora_header(model, Path::to_path_buf);
    let mut failure = None;
    let mut out = std::io::Cursor::new(Vec::new());
    let result = write_to(&mut out, model, lora, extra_sections, meta, &mut failure);
    match (failure, result) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(Error::checkpoint(Path::new("(in memory)"), e.to_string())),
        (None, Ok(())) => Ok(out.into_inner()),
    }
}

/// The header's description of `model`'s adapters, the base's path as `stored` records it.
fn lora_header<B: Backend>(model: &Transformer<B>, stored: impl Fn(&Path) -> PathBuf) -> Option<LoraHeader> {
    model.lora_config().map(|config| LoraHeader {
        config,
        base: model.lora_base.as_ref().map(|b| BaseRef {
            path: stored(&b.path),
            fingerprint: b.fingerprint.clone(),
        }),
    })
}

/// Writes a checkpoint's bytes to `f`. A section's serialisation error (not the writer's) is
/// left in `failure`.
fn write_to<B: Backend, W: Write + Seek>(
    f: &mut W,
    model: &Transformer<B>,
    lora: Option<LoraHeader>,
    extra_sections: Vec<Section>,
    meta: serde_json::Value,
    failure: &mut Option<Error>,
) -> std::io::Result<()> {
    let mut sections = vec![match &lora {
        Some(LoraHeader { base: Some(_), .. }) => {
            Section::record::<B, _>(ADAPTERS_SECTION, model.adapters().into_record())
        }
        _ => Section::record::<B, _>(MODEL_SECTION, model.clone().into_record()),
    }];
    sections.extend(extra_sections);
    let mut header = Header {
        format_version: FORMAT_VERSION,
        config: model.config.clone(),
        sections: sections
            .iter()
            .map(|s| SectionInfo {
                name: s.name.clone(),
                len: u64::MAX,
                crc32: u32::MAX,
            })
            .collect(),
        meta,
        lora,
    };
    let room = serde_json::to_vec(&header).map_err(std::io::Error::other)?.len();
    f.write_all(MAGIC)?;
    f.write_all(&(room as u64).to_le_bytes())?;
    f.write_all(&vec![b' '; room])?;
    for (section, info) in sections.into_iter().zip(&mut header.sections) {
        let mut w = Measured {
            file: &mut *f,
            len: 0,
            crc: crc32fast::Hasher::new(),
            error: None,
        };
        if let Err(e) = (section.write)(&mut w) {
            // The file's error is what the user needs to see ("No space left on device");
            // else the serialiser's own.
            if let Some(io) = w.error.take() {
                return Err(io);
            }
            *failure = Some(e);
            return Err(std::io::Error::other("section not written"));
        }
        (info.len, info.crc32) = (w.len, w.crc.finalize());
    }
    let mut text = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    if text.len() > room {
        return Err(std::io::Error::other(format!(
            "header of {} bytes outgrew its {room} reserved",
            text.len()
        )));
    }
    text.resize(room, b' ');
    f.seek(std::io::SeekFrom::Start(16))?;
    f.write_all(&text)?;
    f.seek(std::io::SeekFrom::End(0))?;
    Ok(())
}

/// The base's path as a checkpoint at `ckpt` records it: its file name when it lies in the
/// same directory (a run's own warm start: the run directory can then move), else absolute.
fn stored_base_path(base: &Path, ckpt: &Path) -> PathBuf {
    let base = fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    let dir = ckpt
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (fs::canonicalize(dir), base.parent(), base.file_name()) {
        (Ok(dir), Some(parent), Some(name)) if dir == parent => PathBuf::from(name),
        _ => base,
    }
}
