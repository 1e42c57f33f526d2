//! Hugging Face import and export against `transformers` itself: the fixtures under
//! `tests/fixtures/hf/` are tiny random Llama (bf16, one file) and Qwen2 (f16, sharded, tied,
//! q/k/v biases) models saved by `save_pretrained`, with the logits `transformers` computes
//! for fixed inputs (`make_fixtures.py`). Both forward paths must reproduce those logits,
//! export → import must be bit-identical, and broken directories must say what is broken.

use std::fs;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::prelude::*;
use mrt::data::TextTokenizer;
use mrt::model::hf;
use mrt::model::{KvCache, Transformer};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

type B = Flex;

const FAMILIES: [&str; 2] = ["llama", "qwen2"];

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(family)
}

struct Reference {
    ids: Vec<Vec<u32>>,
    /// `[rows, positions, vocab]`, flattened.
    logits: Vec<f32>,
    vocab: usize,
}

fn reference(family: &str) -> Reference {
    let path = fixture(family).join("reference.json");
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(v["input_ids"].clone()).unwrap();
    let shape: Vec<usize> = serde_json::from_value(v["shape"].clone()).unwrap();
    let logits: Vec<f32> = serde_json::from_value(v["logits"].clone()).unwrap();
    assert_eq!(shape[0] * shape[1] * shape[2], logits.len());
    Reference {
        ids,
        logits,
        vocab: shape[2],
    }
}

fn ids_tensor(rows: &[Vec<u32>]) -> Tensor<B, 2, Int> {
    let flat: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), &Default::default())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn load(dir: &Path) -> Transformer<B> {
    hf::load::<B>(dir, &Default::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mrt-hf-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

#[test]
fn imported_configs_are_the_saved_models() {
    let llama = load(&fixture("llama")).config;
    assert_eq!(
        (
            llama.vocab_size,
            llama.d_model,
            llama.n_layers,
            llama.n_heads,
            llama.n_kv_heads,
            llama.d_ff
        ),
        (96, 64, 2, 4, 2, 128)
    );
    assert_eq!(
        (llama.rope_theta, llama.norm_eps, llama.tie_embeddings, llama.qkv_bias),
        (1000.0, 1e-5, false, false)
    );
    let qwen2 = load(&fixture("qwen2")).config;
    assert_eq!(
        (
            qwen2.n_kv_heads,
            qwen2.rope_theta,
            qwen2.norm_eps,
            qwen2.tie_embeddings,
            qwen2.qkv_bias
        ),
        (1, 10_000.0, 1e-6, true, true)
    );
    assert!(
        fixture("qwen2").join(hf::INDEX).is_file(),
        "the Qwen2 fixture is meant to be sharded"
    );
}

/// Full-sequence logits equal `transformers`' at every position of both rows.
#[test]
fn full_forward_matches_transformers() {
    for family in FAMILIES {
        let (model, r) = (load(&fixture(family)), reference(family));
        let ours: Vec<f32> = model.forward(ids_tensor(&r.ids)).into_data().to_vec().unwrap();
        let d = max_diff(&ours, &r.logits);
        assert!(d < 1e-4, "{family}: full forward differs from transformers by {d}");
    }
}

/// A 5-token prefill, then one token at a time: each step's logits equal `transformers'`.
#[test]
fn cached_decoding_matches_transformers() {
    for family in FAMILIES {
        let (model, r) = (load(&fixture(family)), reference(family));
        let (rows, len) = (r.ids.len(), r.ids[0].len());
        let at = |row: usize, pos: usize| &r.logits[(row * len + pos) * r.vocab..(row * len + pos + 1) * r.vocab];
        let mut cache: KvCache<B> = model.new_cache(rows, len);
        let prefix: Vec<Vec<u32>> = r.ids.iter().map(|row| row[..5].to_vec()).collect();
        let logits: Vec<f32> = model
            .forward_cached(ids_tensor(&prefix), &mut cache, None)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        for row in 0..rows {
            for pos in 0..5 {
                let ours = &logits[(row * 5 + pos) * r.vocab..(row * 5 + pos + 1) * r.vocab];
                let d = max_diff(ours, at(row, pos));
                assert!(d < 1e-4, "{family}: prefill row {row} position {pos} differs by {d}");
            }
        }
        for pos in 5..len {
            let step: Vec<Vec<u32>> = r.ids.iter().map(|row| vec![row[pos]]).collect();
            let logits: Vec<f32> = model
                .forward_cached(ids_tensor(&step), &mut cache, None)
                .unwrap()
                .into_data()
                .to_vec()
                .unwrap();
            for row in 0..rows {
                let d = max_diff(&logits[row * r.vocab..(row + 1) * r.vocab], at(row, pos));
                assert!(d < 1e-4, "{family}: decoding row {row} position {pos} differs by {d}");
            }
        }
    }
}

/// Export writes f32 safetensors, so importing the export gives back exactly the same
/// parameters and logits; the config and the copied files survive too.
#[test]
fn export_then_import_is_bit_identical() {
    for family in FAMILIES {
        let model = load(&fixture(family));
        let out = scratch(&format!("export-{family}"));
        let extra = fixture(family).join("reference.json");
        hf::save(&model, &out, Some(1), Some(2), std::slice::from_ref(&extra)).unwrap();
        assert!(out.join("reference.json").is_file() && out.join(hf::SINGLE).is_file());
        let back = load(&out);
        assert_eq!(back.config, model.config, "{family}: config changed");
        let (a, b) = (
            model.forward(ids_tensor(&reference(family).ids)),
            back.forward(ids_tensor(&reference(family).ids)),
        );
        assert_eq!(
            a.into_data().to_vec::<f32>().unwrap(),
            b.into_data().to_vec::<f32>().unwrap(),
            "{family}: logits changed"
        );
        // Every stored tensor is identical, bit for bit.
        let again = scratch(&format!("export-{family}-again"));
        hf::save(&back, &again, Some(1), Some(2), &[]).unwrap();
        assert_eq!(
            fs::read(out.join(hf::SINGLE)).unwrap(),
            fs::read(again.join(hf::SINGLE)).unwrap(),
            "{family}: weights changed"
        );
        let config: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let arch = if family == "llama" {
            "LlamaForCausalLM"
        } else {
            "Qwen2ForCausalLM"
        };
        assert_eq!(config["architectures"][0], arch);
        assert_eq!(
            (config["bos_token_id"].as_u64(), config["eos_token_id"].as_u64()),
            (Some(1), Some(2))
        );
        // A second export to the same place is refused rather than mixed into the first.
        let err = hf::save(&back, &out, None, None, &[]).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        let _ = (fs::remove_dir_all(&out), fs::remove_dir_all(&again));
    }
}

/// A copy of the Llama fixture with `config.json` edited by `edit`, only the tensors that `keep`
/// accepts, and `extra` (a zero bf16 tensor of that name and shape) added.
fn broken_copy(
    name: &str,
    edit: impl Fn(&mut serde_json::Value),
    keep: impl Fn(&str) -> bool,
    extra: Option<(&str, Vec<usize>)>,
) -> PathBuf {
    let src = fixture("llama");
    let dir = scratch(name);
    fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let bytes = fs::read(src.join(hf::SINGLE)).unwrap();
    let zeros = vec![
        0u8;
        extra
            .as_ref()
            .map_or(0, |(_, shape)| shape.iter().product::<usize>() * 2)
    ];
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, TensorView)> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    if let Some((extra_name, shape)) = extra {
        tensors.push((
            extra_name.to_string(),
            TensorView::new(safetensors::Dtype::BF16, shape, &zeros).unwrap(),
        ));
    }
    fs::write(dir.join(hf::SINGLE), safetensors::serialize(tensors, None).unwrap()).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match hf::load::<B>(dir, &Default::default()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_model_directories_say_what_is_wrong() {
    let same = |_: &mut serde_json::Value| {};
    let all = |_: &str| true;
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "missing tensor",
            broken_copy("missing", same, |n| n != "model.norm.weight", None),
            "`model.norm.weight` is missing",
        ),
        (
            "mis-shaped tensor",
            broken_copy("shape", |c| c["intermediate_size"] = 96.into(), all, None),
            "`model.layers.0.mlp.gate_proj.weight` has shape [128, 64], the config needs [96, 64]",
        ),
        (
            "unknown tensor",
            broken_copy(
                "extra",
                same,
                all,
                Some(("model.layers.0.self_attn.o_proj.bias", vec![64])),
            ),
            "`model.layers.0.self_attn.o_proj.bias` (and 0 more) has no place in a Llama model",
        ),
        (
            "unsupported architecture",
            broken_copy(
                "arch",
                |c| c["architectures"] = serde_json::json!(["MistralForCausalLM"]),
                all,
                None,
            ),
            "unsupported architectures [\"MistralForCausalLM\"]",
        ),
        (
            "scaled rotary embeddings",
            broken_copy(
                "rope",
                |c| c["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
                all,
                None,
            ),
            "`rope_parameters`",
        ),
        (
            "another activation",
            broken_copy("act", |c| c["hidden_act"] = "gelu".into(), all, None),
            "`hidden_act` = \"gelu\"",
        ),
    ];
    for (what, dir, expected) in cases {
        let err = load_err(&dir);
        assert!(err.contains(expected), "{what}: `{err}` does not contain `{expected}`");
        let _ = fs::remove_dir_all(&dir);
    }

    // A truncated weights file, an empty one, a directory without weights, one without config.json.
    let dir = broken_copy("truncated", same, all, None);
    let bytes = fs::read(dir.join(hf::SINGLE)).unwrap();
    fs::write(dir.join(hf::SINGLE), &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors: not a complete safetensors file"),
        "{err}"
    );
    fs::write(dir.join(hf::SINGLE), b"").unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors: not a complete safetensors file"),
        "empty file: {err}"
    );
    fs::remove_file(dir.join(hf::SINGLE)).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("has neither `model.safetensors` nor `model.safetensors.index.json`"),
        "{err}"
    );
    fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("config.json"), "{err}");
    let _ = fs::remove_dir_all(&dir);
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(err.contains("is neither a model directory nor a GGUF file"), "{err}");
}

/// The model's own tokenizer: the ids and text `transformers` gives, and its special tokens.
#[test]
fn tokenizers_match_transformers() {
    for family in FAMILIES {
        let dir = fixture(family);
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let tok = TextTokenizer::load(&dir).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["text_ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(v["text"].as_str().unwrap()).unwrap(),
            ids,
            "{family}: encoding"
        );
        assert_eq!(
            tok.decode(&ids).unwrap(),
            v["text_decoded"].as_str().unwrap(),
            "{family}: decoding"
        );
        let special = |k: &str| v["special_ids"][k].as_u64().map(|id| id as u32);
        assert_eq!(tok.bos, special("bos"), "{family}: bos");
        assert_eq!(Some(tok.eos), special("eos"), "{family}: eos");
        // No pad token named: padding uses the end-of-sequence token.
        assert_eq!(tok.pad, special("pad").unwrap_or(tok.eos), "{family}: pad");
        // `</think>` is the fourth special token make_fixtures.py trains with.
        assert_eq!(tok.end_think, Some(3));
        assert!(tok.end_think.is_some() && tok.size() <= load(&dir).config.vocab_size);
    }
    let err = TextTokenizer::load(Path::new("/nonexistent")).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json: file not found"), "{err}");
    // A tokenizer_config.json naming a token the vocabulary lacks.
    let dir = scratch("tokenizer");
    fs::create_dir_all(&dir).unwrap();
    fs::copy(fixture("llama").join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "<|im_end|>"}}"#,
    )
    .unwrap();
    let err = TextTokenizer::load(&dir).unwrap_err().to_string();
    assert!(err.contains("eos_token `<|im_end|>` is not in the vocabulary"), "{err}");
    fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    let err = TextTokenizer::load(&dir).unwrap_err().to_string();
    assert!(err.contains("no end-of-sequence token"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}
