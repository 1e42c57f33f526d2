//! Checkpoints round-trip exactly and reject bad files with an error, never a panic.

use std::fs;
use std::path::PathBuf;

use burn::backend::Flex;
use burn::prelude::*;
use mrt::model::checkpoint::{from_bytes, load, save, to_bytes, Section};
use mrt::model::{Transformer, TransformerConfig};

type B = Flex;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-ckpt-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn logits(m: &Transformer<B>) -> Vec<f32> {
    let tok = Tensor::<B, 2, Int>::from_data([[1i64, 2, 3, 4]], &m.device());
    m.forward(tok).into_data().to_vec().unwrap()
}

fn saved(name: &str) -> (PathBuf, Transformer<B>) {
    let cfg = TransformerConfig::preset("cpu-tiny").unwrap();
    let m = Transformer::<B>::new(&cfg, 21, &Default::default()).unwrap();
    let path = dir(name).join("model.ckpt");
    save(
        &path,
        &m,
        vec![Section::bytes("extra", vec![1, 2, 3])],
        serde_json::json!({"step": 12}),
    )
    .unwrap();
    (path, m)
}

#[test]
fn round_trip_gives_identical_logits_and_metadata() {
    let (path, m) = saved("roundtrip");
    let ck = load(&path, Some(&m.config)).unwrap();
    let back = ck.model::<B>(&Default::default()).unwrap();
    assert_eq!(logits(&m), logits(&back));
    assert_eq!(ck.meta["step"], 12);
    assert_eq!(ck.section("extra").unwrap(), &[1, 2, 3]);
    // No temporary file is left beside the checkpoint.
    let names: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// A checkpoint in memory (sent to another process by data-parallel nodes) is the file's bytes
/// exactly, and reads back the same; a cut or altered buffer is an error naming it.
#[test]
fn in_memory_checkpoints_are_the_files_bytes() {
    let (path, m) = saved("bytes");
    let bytes = to_bytes(
        &m,
        vec![Section::bytes("extra", vec![1, 2, 3])],
        serde_json::json!({"step": 12}),
    )
    .unwrap();
    assert_eq!(bytes, fs::read(&path).unwrap());
    let label = std::path::Path::new("(received)");
    let ck = from_bytes(label, bytes.clone(), Some(&m.config)).unwrap();
    assert_eq!(logits(&m), logits(&ck.model::<B>(&Default::default()).unwrap()));
    assert_eq!(ck.section("extra").unwrap(), &[1, 2, 3]);

    let cut = from_bytes(label, bytes[..bytes.len() - 1].to_vec(), None)
        .unwrap_err()
        .to_string();
    assert!(cut.contains("(received)") && cut.contains("truncated"), "{cut}");
    let mut altered = bytes;
    let last = altered.len() - 2;
    altered[last] ^= 1;
    let bad = from_bytes(label, altered, None).unwrap_err().to_string();
    assert!(bad.contains("checksum"), "{bad}");
}

fn err(path: &std::path::Path, expected: Option<&TransformerConfig>) -> String {
    load(path, expected)
        .and_then(|c| c.model::<B>(&Default::default()))
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_files_are_errors_naming_the_problem() {
    let (path, m) = saved("bad");
    let bytes = fs::read(&path).unwrap();
    let d = path.parent().unwrap();

    assert!(err(&d.join("missing.ckpt"), None).contains("cannot read"));

    let truncated = d.join("truncated.ckpt");
    fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    assert!(err(&truncated, None).contains("truncated"), "{}", err(&truncated, None));

    let flipped = d.join("flipped.ckpt");
    let mut b = bytes.clone();
    let n = b.len();
    b[n - 1000] ^= 0x40;
    fs::write(&flipped, &b).unwrap();
    assert!(err(&flipped, None).contains("checksum"), "{}", err(&flipped, None));

    let garbage = d.join("garbage.ckpt");
    fs::write(&garbage, b"hello world, not a checkpoint").unwrap();
    assert!(err(&garbage, None).contains("magic"));

    let mut other = m.config.clone();
    other.d_model = 128;
    let e = err(&path, Some(&other));
    assert!(e.contains("another model config") && e.contains("d_model"), "{e}");
}
