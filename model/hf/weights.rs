//! Reading the tensors of a Hugging Face model directory: one `model.safetensors`, or shards
//! listed in `model.safetensors.index.json`. Tensors are read one at a time and widened to f32
//! (from f32, f16 or bf16). The files are memory-mapped, so a multi-gigabyte checkpoint is
//! paged in as its tensors are read instead of being copied into memory first; the host never
//! holds a second f32 copy of the whole model, only one tensor at a time.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use super::gguf::GgufWeights;
use crate::error::{Error, Result};
use crate::fsutil::read_json;

/// File of a single-file checkpoint.
pub const SINGLE: &str = "model.safetensors";
/// Index of a sharded checkpoint: `{"weight_map": {tensor name: shard file}}`.
pub const INDEX: &str = "model.safetensors.index.json";

/// One safetensors file, its header parsed once.
struct Shard {
    path: PathBuf,
    bytes: Mmap,
    /// Where the data section starts (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// The tensors of a pretrained model, under their `transformers` names: a directory's
/// safetensors files, or a GGUF file's tensors dequantised.
pub enum Weights {
    Safetensors(Safetensors),
    Gguf(GgufWeights),
}

impl Weights {
    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Safetensors(w) => w.contains(name),
            Self::Gguf(w) => w.contains(name),
        }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Self::Safetensors(w) => w.names(),
            Self::Gguf(w) => w.names(),
        }
    }

    /// The values of tensor `name` as f32, row-major, checked against the `shape` the model needs.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self {
            Self::Safetensors(w) => w.get(name, shape),
            Self::Gguf(w) => w.get(name, shape),
        }
    }
}

/// Every tensor of a model directory, by name.
pub struct Safetensors {
    shards: Vec<Shard>,
    /// Tensor name → shard.
    by_name: HashMap<String, usize>,
}

impl Safetensors {
    /// Opens `dir/model.safetensors`, or the shards that `dir/model.safetensors.index.json`
    /// names (each read once, however many tensors it holds).
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX);
        let files: Vec<PathBuf> = if index.is_file() {
            let map = shard_map(&index)?;
            let mut files: Vec<PathBuf> = map.values().map(|f| dir.join(f)).collect();
            files.sort();
            files.dedup();
            files
        } else if dir.join(SINGLE).is_file() {
            vec![dir.join(SINGLE)]
        } else {
            return Err(Error::pretrained(dir, format!("has neither `{SINGLE}` nor `{INDEX}`")));
        };
        Self::open_files(files)
    }

    /// Opens the given safetensors files as one set of tensors (no name in two of them).
    pub fn open_files(files: Vec<PathBuf>) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut by_name = HashMap::new();
        for path in files {
            let file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only and lives as long as `Weights`. Another process
            // truncating or rewriting the file meanwhile could change what is read (or fault);
            // that is the contract of every memory-mapped safetensors reader, and a model
            // directory is not written while a model loads from it.
            let bytes = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            // The crate checks that the header's offsets cover the data exactly, which catches a
            // truncated download.
            let (header, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| {
                Error::pretrained(
                    &path,
                    format!("not a complete safetensors file ({e}): truncated or corrupt?"),
                )
            })?;
            let data_start = 8 + header;
            let shard = shards.len();
            for name in metadata.tensors().into_keys() {
                if let Some(first) = by_name.insert(name.clone(), shard) {
                    let first: &Shard = &shards[first];
                    return Err(Error::pretrained(
                        &path,
                        format!("tensor `{name}` is also stored in {}", first.path.display()),
                    ));
                }
            }
            shards.push(Shard {
                path,
                bytes,
                data_start,
                metadata,
            });
        }
        Ok(Self { shards, by_name })
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The values of tensor `name` as f32, row-major, checked against the `shape` the model needs.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some(&shard) = self.by_name.get(name) else {
            let dir = self
                .shards
                .first()
                .and_then(|s| s.path.parent())
                .unwrap_or(Path::new("."));
            return Err(Error::pretrained(dir, format!("tensor `{name}` is missing")));
        };
        let shard = &self.shards[shard];
        let info = shard.metadata.info(name).expect("indexed at open");
        if info.shape != shape {
            return Err(Error::pretrained(
                &shard.path,
                format!("tensor `{name}` has shape {:?}, the config needs {shape:?}", info.shape),
            ));
        }
        let (start, end) = info.data_offsets;
        let raw = &shard.bytes[shard.data_start + start..shard.data_start + end];
        widen(raw, info.dtype).ok_or_else(|| {
            Error::pretrained(
                &shard.path,
                format!("tensor `{name}` is {:?}; supported: F32, F16, BF16", info.dtype),
            )
        })
    }
}

/// Little-endian f32, f16 or bf16 bytes as f32 values (exact: both half formats widen
/// losslessly); `None` for any other element type.
fn widen(raw: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let pairs = || raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    Some(match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => pairs().map(|b| f16::from_bits(b).to_f32()).collect(),
        Dtype::BF16 => pairs().map(|b| bf16::from_bits(b).to_f32()).collect(),
        _ => return None,
    })
}

/// The `weight_map` of a shard index.
fn shard_map(index: &Path) -> Result<HashMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let parsed: Index = read_json(index)?;
    if let Some(bad) = parsed
        .weight_map
        .values()
        .find(|f| Path::new(f).components().count() != 1)
    {
        return Err(Error::pretrained(
            index,
            format!("shard `{bad}` is not a file name in the model directory"),
        ));
    }
    Ok(parsed.weight_map)
}
