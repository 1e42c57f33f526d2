#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one call on a GPU machine that has no Rust toolchain:
# PyTorch's reference (shared/reference/torch_ref.py) and our throughput bench on CUDA and wgpu
# for the `tiny` and `small` presets, then the default `train` run with its wall time, all
# written to one JSON file. The binaries are built here; BENCHMARKS.md ("GPU: how to measure")
# lists the build-and-carry steps.
#
#   benches/device.sh BUNDLE [OUT.json]
#
# BUNDLE holds `throughput.gz` and `train.gz` (stripped, gzipped x86-64 binaries built with
# `--features cuda`, which keeps wgpu too), `torch_ref.py`, and optionally `debs/*.deb` (Debian's
# libvulkan1 and libegl1, unpacked when the machine has no Vulkan loader). Environment knobs:
# PRESETS (default "tiny small"), DEVICES (default "cuda wgpu"), ITERS (default 10), TRAIN
# (default 1: also run `train`), DEADLINE (seconds for the whole script, default 540, so that
# one 10-minute device call holds it with room to spare; each step gets what is left).
set -uo pipefail

bundle="${1:?usage: benches/device.sh BUNDLE [OUT.json]}"
out="${2:-device.json}"
presets="${PRESETS:-tiny small}"
devices="${DEVICES:-cuda wgpu}"
iters="${ITERS:-10}"
deadline=$(( $(date +%s) + ${DEADLINE:-540} ))
work="$(mktemp -d)"
results="$work/results.jsonl"
: > "$results"

for f in "$bundle"/*.gz; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .gz)"
    gunzip -c "$f" > "$work/$name" && chmod +x "$work/$name"
done
if ! ldconfig -p | grep -q 'libvulkan\.so\.1' && ls "$bundle"/debs/*.deb > /dev/null 2>&1; then
    for d in "$bundle"/debs/*.deb; do dpkg -x "$d" /; done
    ldconfig
fi

# step NAME LIMIT_S COMMAND...: runs it under min(LIMIT_S, time left), records exit code, wall
# seconds, the last JSON line it printed, and on failure the end of its stderr.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 20 ]; then
        echo "{\"step\": \"$name\", \"skipped\": \"deadline reached\"}" >> "$results"
        echo "$name: skipped (deadline)" >&2
        return
    fi
    [ "$left" -lt "$limit" ] && limit="$left"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout "$limit" "$@" > "$work/$name.out" 2> "$work/$name.err"
    rc=$?
    t1=$(date +%s.%N)
    python3 - "$name" "$rc" "$t0" "$t1" "$limit" "$work/$name.out" "$work/$name.err" >> "$results" << 'PY'
import json, sys
name, rc, t0, t1, limit, out, err = sys.argv[1:]
last = None
for line in open(out, errors="replace"):
    line = line.strip()
    if line.startswith("{"):
        try:
            last = json.loads(line)
        except ValueError:
            pass
rc = int(rc)
record = {"step": name, "rc": rc, "timed_out": rc == 124, "limit_s": int(limit), "wall_s": round(float(t1) - float(t0), 2), "result": last}
if rc != 0 or last is None:
    record["stderr_tail"] = open(err, errors="replace").read()[-3000:]
print(json.dumps(record))
PY
    echo "$name: exit $rc after $(python3 -c "print(round($t1 - $t0, 1))") s" >&2
}

torch_device=cuda
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null || torch_device=cpu
for p in $presets; do
    step "torch-$p" 120 python3 "$bundle/torch_ref.py" --preset "$p" --device "$torch_device" --iters "$iters"
    for d in $devices; do
        step "burn-$d-$p" 240 "$work/throughput" --preset "$p" --device "$d" --iters "$iters"
    done
done
if [ "${TRAIN:-1}" = 1 ]; then
    # The user's first command: `cargo run --release --bin train` (here with CUDA built in).
    step "train-default" 400 "$work/train" --out "$work/runs" --quiet
    tail -n 30 "$work/train-default.err" > "$work/train-tail.txt" 2> /dev/null
fi

python3 - "$results" "$out" "$work" << 'PY'
import json, os, platform, subprocess, sys
results, out, work = sys.argv[1:]
def cmd(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"unavailable: {e}"
doc = {
    "gpu": cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
    "cpu": platform.processor() or cmd("sh", "-c", "grep -m1 'model name' /proc/cpuinfo"),
    "steps": [json.loads(l) for l in open(results) if l.strip()],
}
tail = os.path.join(work, "train-tail.txt")
if os.path.exists(tail):
    doc["train_tail"] = open(tail, errors="replace").read()
with open(out, "w") as f:
    json.dump(doc, f, indent=1)
print(f"wrote {out}: {len(doc['steps'])} steps")
PY
