"""Development check (never a dependency of the product): do PEFT users get our LoRA model?

    export --model BASE.gguf --out BASE_HF                      # the base as a HF directory
    export --checkpoint RUN/checkpoints/final.ckpt --out MERGED # adapters merged by us
    export --checkpoint RUN/checkpoints/final.ckpt --adapters --out ADAPTERS
    python3 benches/peft_check.py --base BASE_HF --adapters ADAPTERS --merged MERGED

Loads BASE_HF with `transformers`, puts ADAPTERS on it with `peft.PeftModel.from_pretrained`
(the layout `export --adapters` writes), and compares its logits on fixed token ids with those
of MERGED (our merge, whose logits equal the adapted model's within 1e-5: tests/lora.rs) and
with the base alone (to show the adapters change something). Prints one JSON object. Needs
`torch`, `transformers` and `peft`.
"""

import argparse
import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--merged", required=True)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    torch.manual_seed(0)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    base = load(args.base)
    ids = torch.randint(0, base.config.vocab_size, (2, args.tokens))
    plain = logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, args.adapters).eval()
    with_peft = logits(peft_model, ids)
    merged = logits(load(args.merged), ids)
    scale = merged.abs().max().item()
    print(
        json.dumps(
            {
                "peft_vs_merged_max_abs": (with_peft - merged).abs().max().item(),
                "logit_scale": scale,
                "adapters_change_max_abs": (with_peft - plain).abs().max().item(),
                "adapter_tensors": sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n),
            }
        )
    )


if __name__ == "__main__":
    main()
