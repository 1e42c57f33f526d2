//! Checkpoint files: a JSON header (format version, model config, caller's metadata) and named
//! binary sections (model weights, optimizer state, …), each with its length and CRC-32.
//!
//! Layout: `b"MRTCKPT1"`, header length (u64 LE), header JSON, then the sections back to back.
//! Files are written to a temporary sibling, flushed, and renamed into place, so a crash never
//! leaves a half-written checkpoint under the real name; a truncated or corrupted file is caught
//! by the lengths and checksums before anything is deserialised.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use serde::{Deserialize, Serialize};

use super::config::TransformerConfig;
use super::transformer::Transformer;
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;

const MAGIC: &[u8; 8] = b"MRTCKPT1";
const FORMAT_VERSION: u32 = 1;

/// Name of the section holding the model's weights.
pub const MODEL_SECTION: &str = "model";

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
}

/// A checkpoint read back from disk, sections verified.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub config: TransformerConfig,
    pub meta: serde_json::Value,
    sections: Vec<(String, Vec<u8>)>,
}

impl Checkpoint {
    /// Bytes of a named section.
    pub fn section(&self, name: &str) -> Result<&[u8]> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
            .ok_or_else(|| Error::checkpoint(&self.path, format!("has no `{name}` section")))
    }

    /// Rebuilds the model stored in this checkpoint on `device`.
    pub fn model<B: Backend>(&self, device: &B::Device) -> Result<Transformer<B>> {
        let record = decode_record::<B, _>(&self.path, self.section(MODEL_SECTION)?, device)?;
        let model = Transformer::<B>::new(&self.config, 0, device)
            .map_err(|e| Error::checkpoint(&self.path, format!("stored config is invalid: {e}")))?
            .load_record(record);
        let expected = self.config.num_params();
        if model.num_params() != expected {
            return Err(Error::checkpoint(
                &self.path,
                format!("weights hold {} parameters, the stored config needs {expected}", model.num_params()),
            ));
        }
        Ok(model)
    }
}

/// Serialises a module's record (model or optimizer state) to bytes.
pub fn encode_record<B: Backend, R: burn::record::Record<B>>(record: R) -> Result<Vec<u8>> {
    NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
        .record(record, ())
        .map_err(|e| Error::checkpoint("<memory>", format!("cannot encode record: {e}")))
}

/// Deserialises a record written by [`encode_record`].
pub fn decode_record<B: Backend, R: burn::record::Record<B>>(path: &Path, bytes: &[u8], device: &B::Device) -> Result<R> {
    NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
        .load(bytes.to_vec(), device)
        .map_err(|e| Error::checkpoint(path, format!("cannot decode record: {e}")))
}

/// Writes a checkpoint atomically: the model plus any extra sections and metadata.
pub fn save<B: Backend>(
    path: &Path,
    model: &Transformer<B>,
    extra_sections: Vec<(String, Vec<u8>)>,
    meta: serde_json::Value,
) -> Result<()> {
    let mut sections = vec![(MODEL_SECTION.to_string(), encode_record::<B, _>(model.clone().into_record())?)];
    sections.extend(extra_sections);
    let header = Header {
        format_version: FORMAT_VERSION,
        config: model.config.clone(),
        sections: sections
            .iter()
            .map(|(name, bytes)| SectionInfo {
                name: name.clone(),
                len: bytes.len() as u64,
                crc32: crc32fast::hash(bytes),
            })
            .collect(),
        meta,
    };
    let header = serde_json::to_vec(&header).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let mut buf = Vec::with_capacity(16 + header.len() + sections.iter().map(|s| s.1.len()).sum::<usize>());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(header.len() as u64).to_le_bytes());
    buf.extend_from_slice(&header);
    for (_, bytes) in &sections {
        buf.extend_from_slice(bytes);
    }
    write_atomic(path, &buf)
}

/// Reads and verifies a checkpoint. With `expected`, a checkpoint of another model config is
/// rejected, naming the fields that differ.
pub fn load(path: &Path, expected: Option<&TransformerConfig>) -> Result<Checkpoint> {
    let bytes = fs::read(path).map_err(|e| Error::checkpoint(path, format!("cannot read: {e}")))?;
    let bad = |reason: String| Error::checkpoint(path, reason);
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(bad("not a checkpoint of this project (bad magic bytes)".into()));
    }
    let header_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let body = &bytes[16..];
    if header_len > body.len() {
        return Err(bad(format!("truncated: header of {header_len} bytes, {} present", body.len())));
    }
    let header: Header =
        serde_json::from_slice(&body[..header_len]).map_err(|e| bad(format!("corrupt header: {e}")))?;
    if header.format_version != FORMAT_VERSION {
        return Err(bad(format!("format version {} (this build reads {FORMAT_VERSION})", header.format_version)));
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
            return Err(bad(format!("truncated: section `{}` needs {} bytes, {} present", info.name, info.len, body.len() - offset)));
        }
        let data = &body[offset..end];
        if crc32fast::hash(data) != info.crc32 {
            return Err(bad(format!("section `{}` is corrupt (checksum mismatch)", info.name)));
        }
        sections.push((info.name.clone(), data.to_vec()));
        offset = end;
    }
    if offset != body.len() {
        return Err(bad(format!("{} unexpected trailing bytes", body.len() - offset)));
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        config: header.config,
        meta: header.meta,
        sections,
    })
}

/// `field: expected → found` for every field that differs.
fn config_diff(expected: &TransformerConfig, found: &TransformerConfig) -> String {
    let (a, b) = (serde_json::to_value(expected).unwrap_or_default(), serde_json::to_value(found).unwrap_or_default());
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return String::new();
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: expected {v}, found {}", b.get(k).cloned().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("; ")
}
