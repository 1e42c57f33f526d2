//! `export`: writes a model as a Hugging Face directory (`config.json`, f32 `model.safetensors`,
//! the tokenizer) that `transformers` loads as `LlamaForCausalLM` (or `Qwen2ForCausalLM` for a
//! model with q/k/v biases), so a model trained here is served with the usual tools.
//!
//!     export --checkpoint runs/search-mrt-dense-s0/checkpoints/final.ckpt --out my-model
//!     export --model path/to/hf-model --out copy      # import and write back (a round trip)
//!     export --checkpoint RUN/checkpoints/final.ckpt --adapters --out peft-dir   # LoRA, PEFT layout
//!
//! A checkpoint of LoRA adapters is exported with the adapters merged into its base's weights.
//!
//! Runs on the CPU: exporting is copying tensors, no GPU helps.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use burn::backend::Flex;
use clap::Parser;
use mrt::backend::{exit_code, tune_allocator};
use mrt::data::{TextTokenizer, Vocab};
use mrt::model::{checkpoint, hf, Transformer};
use mrt::rl::protocol::TOKENIZER_FILES;

/// Export a model as a Hugging Face directory.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// A checkpoint of this project (a run's `checkpoints/*.ckpt`); the run's `tokenizer.json`
    /// goes with it.
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    checkpoint: Option<PathBuf>,
    /// A pretrained model to write as a Hugging Face directory: a directory (Llama or Qwen2;
    /// a round trip) or a GGUF file (dequantised to f32, with its tokenizer and chat template).
    #[arg(long, value_name = "DIR|FILE.gguf")]
    model: Option<PathBuf>,
    /// New directory to write.
    #[arg(long)]
    out: PathBuf,
    /// For a checkpoint of LoRA adapters: write the adapters alone in PEFT's layout
    /// (`adapter_config.json`, `adapter_model.safetensors`) instead of the merged model.
    #[arg(long, requires = "checkpoint")]
    adapters: bool,
}

fn run(args: Args) -> Result<()> {
    let device = Default::default();
    let (model, files, bos, eos): (Transformer<Flex>, Vec<PathBuf>, Option<u32>, Option<u32>) =
        match (&args.checkpoint, &args.model) {
            (Some(ckpt), _) => {
                let model = checkpoint::load(ckpt, None)?.model::<Flex>(&device)?;
                if args.adapters {
                    return export_adapters(&model, ckpt, &args.out);
                }
                let run = run_dir_of(ckpt);
                let tokenizer = run.join("tokenizer.json");
                if !tokenizer.is_file() {
                    bail!(
                        "{}: no tokenizer.json beside the run's checkpoints (expected {})",
                        ckpt.display(),
                        tokenizer.display()
                    );
                }
                // A fine-tuned pretrained model keeps its own tokenizer files; a synthetic task's
                // run has its word vocabulary.
                if run.join("tokenizer_config.json").is_file() {
                    let text = TextTokenizer::load(&run)?;
                    if text.size() > model.config.vocab_size {
                        bail!(
                            "{}: holds {} tokens, the checkpoint's model {}",
                            tokenizer.display(),
                            text.size(),
                            model.config.vocab_size
                        );
                    }
                    let files = TOKENIZER_FILES
                        .iter()
                        .map(|f| run.join(f))
                        .filter(|p| p.is_file())
                        .collect();
                    (model, files, text.bos, Some(text.eos))
                } else {
                    let vocab = Vocab::load(&tokenizer)?;
                    if vocab.size() != model.config.vocab_size {
                        bail!(
                            "{}: holds {} tokens, the checkpoint's model {}",
                            tokenizer.display(),
                            vocab.size(),
                            model.config.vocab_size
                        );
                    }
                    (
                        model,
                        vec![tokenizer],
                        Some(vocab.specials.bos),
                        Some(vocab.specials.eos),
                    )
                }
            }
            (None, Some(file)) if mrt::gguf::is_gguf(file) => {
                let model = hf::load::<Flex>(file, &device)?;
                let text = TextTokenizer::load(file)?;
                // The tokenizer files are written beside the export's temporary directory first
                // and copied in with the weights.
                let staging =
                    args.out
                        .with_file_name(format!(".{}.tokenizer-{}", file_name(&args.out), std::process::id()));
                std::fs::create_dir_all(&staging).with_context(|| staging.display().to_string())?;
                text.save(&staging)?;
                let files: Vec<PathBuf> = ["tokenizer.json", "tokenizer_config.json"]
                    .iter()
                    .map(|f| staging.join(f))
                    .collect();
                let result = hf::save(&model, &args.out, text.bos, Some(text.eos), &files);
                let _ = std::fs::remove_dir_all(&staging);
                result.with_context(|| format!("exporting to {}", args.out.display()))?;
                println!(
                    "{}: {} parameters of {} as {}, with its tokenizer",
                    args.out.display(),
                    model.config.num_params(),
                    file.display(),
                    arch(&model)
                );
                return Ok(());
            }
            (None, Some(dir)) => {
                let model = hf::load::<Flex>(dir, &device)?;
                let config = hf::HfConfig::read(&dir.join("config.json"))?;
                let id = |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v.as_u64()).map(|v| v as u32);
                let files = TOKENIZER_FILES
                    .iter()
                    .map(|f| dir.join(f))
                    .filter(|p| p.is_file())
                    .collect();
                (model, files, id(&config.bos_token_id), id(&config.eos_token_id))
            }
            (None, None) => unreachable!("clap requires one of --checkpoint and --model"),
        };
    hf::save(&model, &args.out, bos, eos, &files).with_context(|| format!("exporting to {}", args.out.display()))?;
    println!(
        "{}: {} parameters as {}{}, with {}",
        args.out.display(),
        model.config.num_params(),
        arch(&model),
        if model.has_lora() {
            " (LoRA adapters merged)"
        } else {
            ""
        },
        if files.is_empty() {
            "no tokenizer files".to_string()
        } else {
            files
                .iter()
                .filter_map(|f| f.file_name()?.to_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    Ok(())
}

/// `export --adapters`: a LoRA checkpoint's adapters in PEFT's layout, naming their base.
fn export_adapters(model: &Transformer<Flex>, ckpt: &Path, out: &Path) -> Result<()> {
    let (Some(config), Some(base)) = (model.lora_config(), &model.lora_base) else {
        bail!(
            "--adapters: {} holds no LoRA adapters over a named base",
            ckpt.display()
        );
    };
    let base_name = std::fs::canonicalize(&base.path)
        .unwrap_or_else(|_| base.path.clone())
        .display()
        .to_string();
    hf::save_peft(model, out, &base_name).with_context(|| format!("exporting to {}", out.display()))?;
    println!(
        "{}: LoRA adapters (rank {}, alpha {}, {} layers × {}) in PEFT's layout, base {base_name}",
        out.display(),
        config.rank,
        config.alpha(),
        model.blocks.len(),
        config
            .targets
            .iter()
            .map(|t| t.hf_name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn arch(model: &Transformer<Flex>) -> &'static str {
    if model.config.qkv_bias {
        "Qwen2ForCausalLM"
    } else {
        "LlamaForCausalLM"
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("export")
        .to_string()
}

/// `RUN/checkpoints/x.ckpt` → `RUN`.
fn run_dir_of(ckpt: &Path) -> PathBuf {
    ckpt.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() -> ExitCode {
    tune_allocator();
    exit_code(run(Args::parse()))
}
