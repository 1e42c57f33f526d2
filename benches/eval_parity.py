"""Development check (never a dependency of the product): does `eval --model` decode what
`transformers` decodes? Greedy completions of our evaluation (its `samples.jsonl`) against
`transformers`' greedy `generate` from the same prompts, token for token, and pass@1 of both.

    eval --model SmolLM2-135M-Instruct.Q4_1.gguf --data gsm8k/test.jsonl --problems 200 \
        --samples 1 --extended-samples 0 --device cpu --out OUT \
        --config <(echo '{"rl": {"rollout": {"max_tokens": 384}}, "eval": {"temperature": 0}}')
    python3 benches/eval_parity.py --samples OUT/samples.jsonl --hf HF_DIR --data gsm8k/test.jsonl \
        --max-new 384 [--batch 32] [--threads 2] [--cache GEN.json]

HF_DIR is `export --model X.gguf` of the same file (its logits equal `transformers`' own GGUF load
exactly; its tokenizer keeps SmolLM's digit split, which `transformers`' GGUF loader drops). Each
prompt is our rendered chat template, re-encoded here without added specials; generation stops at
the tokenizer's EOS or after `max-new` tokens. A completion of ours that hit the budget has the
forced "time is up" suffix and answer after its `max-new` policy tokens: it is compared on those.
Prints one JSON object: identical completions, where the others diverge (token index of the
first difference), and pass@1 of both by the last `\\boxed{}` read as a number.
"""

import argparse
import json
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def last_boxed(text):
    """Content of the last `\\boxed{...}` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    out = []
    while i < len(text):
        c = text[i]
        depth += c == "{"
        depth -= c == "}"
        if depth == 0:
            return "".join(out)
        out.append(c)
        i += 1
    return None


def number(text):
    if text is None:
        return None
    t = text.replace(",", "").replace("$", "").strip()
    try:
        return float(t)
    except ValueError:
        return None


def gold_answers(path):
    """GSM8K question → the number after `####`."""
    gold = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        gold[row["question"].strip()] = float(row["answer"].split("####")[-1].replace(",", "").strip())
    return gold


def question_of(prompt):
    body = prompt.split("<|im_start|>user\n", 1)[1]
    return body.split("\nPlease reason step by step", 1)[0].strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-new", type=int, default=384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", help="JSON file keeping transformers' generations (reused when present)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ours = [json.loads(line) for line in Path(args.samples).read_text().splitlines()]
    gold = gold_answers(args.data)
    tok = AutoTokenizer.from_pretrained(args.hf)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    prompts = [tok(s["prompt"], add_special_tokens=False)["input_ids"] for s in ours]
    order = sorted(range(len(ours)), key=lambda i: len(prompts[i]))
    theirs = [None] * len(ours)
    cache = Path(args.cache) if args.cache else None
    if cache and cache.exists():
        theirs = json.loads(cache.read_text())
        order = []
    for at in range(0, len(order), args.batch):
        idx = order[at : at + args.batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new,
                eos_token_id=eos, pad_token_id=pad,
            )
        for row, i in enumerate(idx):
            gen = out[row, width:].tolist()
            if eos in gen:
                gen = gen[: gen.index(eos)]
            theirs[i] = gen
        print(f"{min(at + args.batch, len(order))}/{len(order)}", flush=True)
    if cache and order:
        cache.write_text(json.dumps(theirs))
    eos_text = tok.decode([eos], skip_special_tokens=False)
    identical, diverged, hf_solved, our_solved = 0, [], 0, 0
    for s, gen in zip(ours, theirs):
        text = tok.decode(gen, skip_special_tokens=False)
        # Ours shows the EOS that ended the answer; transformers' ids are cut before it.
        mine = s["text"].removesuffix(eos_text)
        forced = s["finish"] in ("Forced", "Unfinished")
        if forced:
            # Our budget hit: the policy's text is followed by the forced suffix and answer.
            same = len(gen) == args.max_new and mine.startswith(text)
        else:
            same = mine == text
        if same:
            identical += 1
        else:
            k = 0
            while k < len(gen) and mine.startswith(tok.decode(gen[: k + 1], skip_special_tokens=False)):
                k += 1
            diverged.append({"problem": s["problem"], "first_different_token": k, "hf_tokens": len(gen),
                             "our_policy_tokens": s["policy_tokens"]})
        want = gold[question_of(s["prompt"])]
        hf_solved += number(last_boxed(text)) == want
        policy_text = mine.split("\n\nTime is up.")[0] if forced else mine
        our_solved += number(last_boxed(policy_text)) == want
    n = len(ours)
    print(json.dumps({
        "problems": n,
        "identical": identical,
        "identical_fraction": identical / n,
        "diverged": diverged,
        "pass1_transformers_last_boxed": hf_solved / n,
        "pass1_ours_last_boxed_policy_text": our_solved / n,
        "hf_mean_tokens": sum(len(g) for g in theirs) / n,
    }, indent=1))


if __name__ == "__main__":
    main()
