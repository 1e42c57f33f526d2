//! Checkpoint files: a JSON header (format version, model config, caller's metadata) and named
//! binary sections (model weights, optimizer state, …), each with its length and CRC-32.
//!
//! Layout: `b"MRTCKPT1"`, header length (u64 LE), header JSON (padded with spaces: it is
//! written last, into room reserved for it), then the sections back to back.
//! A model with LoRA adapters over a named base (model/lora.rs) stores only its adapters (an
//! `adapters` section instead of `model`) and the base's path and fingerprint in the header;
//! reading it loads the base from there and refuses a base whose weights changed.
//! Files are written to a temporary sibling, flushed, and renamed into place, so a crash never
//! leaves a half-written checkpoint under the real name; a truncated or corrupted file is caught
//! by the lengths and checksums before anything is deserialised.

use std::fs;
use std::io::{Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::record::{BurnRecord, FullPrecisionSettings, NamedMpkBytesRecorder, Record};
use serde::{Deserialize, Serialize};

use super::config::TransformerConfig;
use super::lora::{lora_params, Adapters, BaseRef, LoraConfig};
use super::transformer::Transformer;
use crate::error::{Error, Result};
use crate::fsutil::write_atomic_with;

const MAGIC: &[u8; 8] = b"MRTCKPT1";
const FORMAT_VERSION: u32 = 1;

/// Name of the section holding the model's weights.
pub const MODEL_SECTION: &str = "model";
/// Name of the section holding a LoRA model's adapters (its base is named in the header).
pub const ADAPTERS_SECTION: &str = "adapters";

/// The adapters of a checkpoint's model and, when they are stored without their base, where
/// the base is (a path relative to the checkpoint's directory, or absolute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraHeader {
    pub config: LoraConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SectionInfo {
    name: String,
    len: u64,
    crc32: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    format_version: u32,
    config: TransformerConfig,
    sections: Vec<SectionInfo>,
    /// Free-form metadata of the caller (step, run name, RNG state, …).
    meta: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lora: Option<LoraHeader>,
}

/// A checkpoint read back from disk, sections verified.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub config: TransformerConfig,
    pub meta: serde_json::Value,
    /// The model's adapters, when it has some.
    pub lora: Option<LoraHeader>,
    /// The whole file, memory-mapped; sections are ranges of it. A pretrained model's run
    /// state is gigabytes: mapped pages are the kernel's page cache, read on demand and never
    /// a second copy in the process's own memory.
    bytes: memmap2::Mmap,
    sections: Vec<(String, Range<usize>)>,
}

impl Checkpoint {
    /// Bytes of a named section.
    pub fn section(&self, name: &str) -> Result<&[u8]> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| &self.bytes[r.clone()])
            .ok_or_else(|| Error::checkpoint(&self.path, format!("has no `{name}` section")))
    }

    /// Rebuilds the model stored in this checkpoint on `device`: for adapters stored without
    /// their base, the base is loaded from where the header names it.
    pub fn model<B: Backend>(&self, device: &B::Device) -> Result<Transformer<B>> {
        let lora = match &self.lora {
            Some(LoraHeader { base: Some(base), .. }) => {
                let path = self.base_path(base);
                return self.adapters_onto(super::lora::load_base(&path, &self.config, device)?, &path);
            }
            Some(h) => Some(&h.config),
            None => None,
        };
        let record = decode_record::<B, _>(&self.path, self.section(MODEL_SECTION)?, device)?;
        let mut model = Transformer::<B>::new(&self.config, 0, device)
            .map_err(|e| Error::checkpoint(&self.path, format!("stored config is invalid: {e}")))?;
        if let Some(config) = lora {
            model = model.with_lora(config, 0, None);
        }
        let model = model.load_record(record);
        let expected = self.config.num_params() + lora.map_or(0, |c| lora_params(&self.config, c));
        if model.num_params() != expected {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "weights hold {} parameters, the stored config needs {expected}",
                    model.num_params()
                ),
            ));
        }
        Ok(model)
    }

    /// `base` (a model without adapters, loaded from `base_path`) with this checkpoint's
    /// adapters, which must have been trained on it: its fingerprint is checked. The base's
    /// tensors are used as they are, so a base already in memory is not copied.
    pub fn adapters_onto<B: Backend>(&self, base: Transformer<B>, base_path: &Path) -> Result<Transformer<B>> {
        let Some(LoraHeader {
            config,
            base: Some(stored),
        }) = &self.lora
        else {
            return Err(Error::checkpoint(&self.path, "holds no adapters over a named base"));
        };
        let found = base.fingerprint();
        if found != stored.fingerprint {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "its adapters were trained on a base with fingerprint {}, but {} has {found} \
                     (a different model, or its weights changed)",
                    stored.fingerprint,
                    base_path.display()
                ),
            ));
        }
        let reference = BaseRef {
            path: base_path.to_path_buf(),
            fingerprint: found,
        };
        let model = base.with_lora(config, 0, Some(reference));
        let record = decode_record::<B, _>(&self.path, self.section(ADAPTERS_SECTION)?, &model.device())?;
        let adapters: Adapters<B> = model.adapters().load_record(record);
        Ok(model.with_adapters(adapters))
    }

    /// Where the base of stored adapters is: relative paths are relative to this checkpoint's
    /// directory.
    pub fn base_path(&self, base: &BaseRef) -> PathBuf {
        match self.path.parent() {
            Some(dir) if base.path.is_relative() => dir.join(&base.path),
            _ => base.path.clone(),
        }
    }
}

/// Whether `path` is a file that starts like a checkpoint of this project.
pub fn is_checkpoint(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == MAGIC
}

/// The record format: Burn's named MessagePack at full precision, as its
/// `NamedMpkBytesRecorder` writes it, but serialised into a writer.
type Format = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Serialises a module's record (model or optimizer state) into `w`.
pub fn write_record<B: Backend, R: Record<B>>(record: R, w: &mut dyn Write) -> Result<()> {
    let item = BurnRecord::<_, B>::new::<Format>(record.into_item::<FullPrecisionSettings>());
    rmp_serde::encode::write_named(w, &item)
        .map_err(|e| Error::checkpoint("<memory>", format!("cannot encode record: {e}")))
}

/// Serialises a module's record to bytes.
pub fn encode_record<B: Backend, R: Record<B>>(record: R) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    write_record::<B, R>(record, &mut bytes)?;
    Ok(bytes)
}

/// Deserialises a record written by [`encode_record`] or [`write_record`].
pub fn decode_record<B: Backend, R: Record<B>>(path: &Path, bytes: &[u8], device: &B::Device) -> Result<R> {
    let record: BurnRecord<R::Item<FullPrecisionSettings>, B> = rmp_serde::decode::from_slice(bytes)
        .map_err(|e| Error::checkpoint(path, format!("cannot decode record: {e}")))?;
    Ok(R::from_item(record.item, device))
}

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
    let lora = model.lora_config().map(|config| LoraHeader {
        config,
        base: model.lora_base.as_ref().map(|b| BaseRef {
            path: stored_base_path(&b.path, path),
            fingerprint: b.fingerprint.clone(),
        }),
    });
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
    let json = |h: &Header| serde_json::to_vec(h).map_err(|e| Error::checkpoint(path, e.to_string()));
    let room = json(&header)?.len();
    let mut failure = None;
    let result = write_atomic_with(path, |f| {
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
                failure = Some(e);
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
        f.write_all(&text)
    });
    match failure {
        Some(e) => Err(e),
        None => result,
    }
}

/// Reads and verifies a checkpoint. With `expected`, a checkpoint of another model config is
/// rejected, naming the fields that differ.
pub fn load(path: &Path, expected: Option<&TransformerConfig>) -> Result<Checkpoint> {
    let file = fs::File::open(path).map_err(|e| Error::checkpoint(path, format!("cannot read: {e}")))?;
    // SAFETY: checkpoints are only ever replaced by renaming a new file over the old one
    // (`write_atomic_with`), never modified in place, so the mapped file does not change
    // under the map.
    let bytes =
        unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::checkpoint(path, format!("cannot read: {e}")))?;
    let bad = |reason: String| Error::checkpoint(path, reason);
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(bad("not a checkpoint of this project (bad magic bytes)".into()));
    }
    let header_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let body = &bytes[16..];
    if header_len > body.len() {
        return Err(bad(format!(
            "truncated: header of {header_len} bytes, {} present",
            body.len()
        )));
    }
    let header: Header =
        serde_json::from_slice(&body[..header_len]).map_err(|e| bad(format!("corrupt header: {e}")))?;
    if header.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} (this build reads {FORMAT_VERSION})",
            header.format_version
        )));
    }
    if let Some(expected) = expected {
        let diff = config_diff(expected, &header.config);
        if !diff.is_empty() {
            return Err(bad(format!("belongs to another model config ({diff})")));
        }
    }
    let mut offset = header_len;
    let mut sections = Vec::with_capacity(header.sections.len());
    for info in &header.sections {
        let end = offset + info.len as usize;
        if end > body.len() {
            return Err(bad(format!(
                "truncated: section `{}` needs {} bytes, {} present",
                info.name,
                info.len,
                body.len() - offset
            )));
        }
        let data = &body[offset..end];
        if crc32fast::hash(data) != info.crc32 {
            return Err(bad(format!("section `{}` is corrupt (checksum mismatch)", info.name)));
        }
        sections.push((info.name.clone(), 16 + offset..16 + end));
        offset = end;
    }
    if offset != body.len() {
        return Err(bad(format!("{} unexpected trailing bytes", body.len() - offset)));
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        config: header.config,
        meta: header.meta,
        lora: header.lora,
        bytes,
        sections,
    })
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

/// `field: expected → found` for every field that differs.
pub(crate) fn config_diff(expected: &TransformerConfig, found: &TransformerConfig) -> String {
    let (a, b) = (
        serde_json::to_value(expected).unwrap_or_default(),
        serde_json::to_value(found).unwrap_or_default(),
    );
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return String::new();
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: expected {v}, found {}", b.get(k).cloned().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("; ")
}
