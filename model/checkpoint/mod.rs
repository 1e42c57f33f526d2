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
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::record::{BurnRecord, FullPrecisionSettings, NamedMpkBytesRecorder, Record};
use serde::{Deserialize, Serialize};

mod write;

pub use write::{save, to_bytes, Section};

use super::config::TransformerConfig;
use super::lora::{lora_params, Adapters, BaseRef, LoraConfig};
use super::transformer::Transformer;
use crate::error::{Error, Result};

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
    /// The whole file, memory-mapped (or, received from another process, in memory); sections
    /// are ranges of it. A pretrained model's run state is gigabytes: mapped pages are the
    /// kernel's page cache, read on demand and never a second copy in the process's own memory.
    bytes: Storage,
    sections: Vec<(String, Range<usize>)>,
}

/// A checkpoint's bytes.
#[derive(Debug)]
enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
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

/// Reads and verifies a checkpoint. With `expected`, a checkpoint of another model config is
/// rejected, naming the fields that differ.
pub fn load(path: &Path, expected: Option<&TransformerConfig>) -> Result<Checkpoint> {
    let file = fs::File::open(path).map_err(|e| Error::checkpoint(path, format!("cannot read: {e}")))?;
    // SAFETY: checkpoints are only ever replaced by renaming a new file over the old one
    // (`write_atomic_with`), never modified in place, so the mapped file does not change
    // under the map.
    let bytes =
        unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::checkpoint(path, format!("cannot read: {e}")))?;
    parse(path, Storage::Mapped(bytes), expected)
}

/// A checkpoint from [`to_bytes`]'s bytes, verified as [`load`] verifies a file; `label` names
/// it in errors.
pub fn from_bytes(label: &Path, bytes: Vec<u8>, expected: Option<&TransformerConfig>) -> Result<Checkpoint> {
    parse(label, Storage::Owned(bytes), expected)
}

fn parse(path: &Path, bytes: Storage, expected: Option<&TransformerConfig>) -> Result<Checkpoint> {
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
