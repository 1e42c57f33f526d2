//! Metrics: one JSON object per line in `metrics.jsonl` (namespaced keys such as
//! `train/loss`, `rollout/reward`, `prover/progress_mean`, `eval/pass@1`), flushed per line so
//! a crash loses nothing written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Appends metric records to a JSONL file.
pub struct MetricsWriter {
    path: PathBuf,
    /// `None`: a data-parallel peer other than the leader, which writes nothing.
    file: Option<File>,
}

impl MetricsWriter {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    /// A writer that drops every record.
    pub fn discard() -> Self {
        Self {
            path: PathBuf::new(),
            file: None,
        }
    }

    pub fn write(&mut self, record: &Record) -> Result<()> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let mut line = serde_json::to_string(&record.0).map_err(|e| Error::Json {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// One line of metrics.
#[derive(Debug, Clone, Default)]
pub struct Record(pub Map<String, Value>);

impl Record {
    pub fn new(phase: &str, step: usize) -> Self {
        let mut r = Self::default();
        r.set("phase", phase);
        r.set("step", step);
        r
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        let v = value.into();
        // JSON has no NaN: a metric that could not be computed is null.
        let v = match v.as_f64() {
            Some(x) if !x.is_finite() => Value::Null,
            _ => v,
        };
        self.0.insert(key.to_string(), v);
        self
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.get(key).and_then(Value::as_f64)
    }
}

/// Reads every record of a metrics file (for plots and tests).
pub fn read_metrics(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                reason: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}
