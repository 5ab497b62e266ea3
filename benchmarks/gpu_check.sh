#!/usr/bin/env bash
# GPU readiness of palmkit in one short run (a few minutes on one CUDA GPU; each step has its own time limit):
#   1. the device-generic test files on cuda (PALMKIT_TEST_DEVICE=cuda, tests/conftest.py),
#   2. a seeded sampled generation on cuda, twice: the same text (the generator lives on the logits' device),
#   3. a `base`-preset bf16 pretraining step: time and MFU against the GPU's peak bf16 FLOP/s,
#   4. DDP over NCCL on one GPU: the same losses as the plain model,
#   5. `palmkit finetune classify` of a `small` model in float32 and bfloat16, DDP over every GPU present
#      (torchrun): examples/s, and the task learned in both,
#   6. tensor-parallel generation over NCCL (a 1-rank mesh; with 2+ GPUs also `palmkit generate --tp 2`) against
#      one process.
# Usage: bash benchmarks/gpu_check.sh [LOG]   (default LOG: gpu_check.log; PEAK_TFLOPS=... for an unknown GPU)
# Without a CUDA GPU it says so and exits 1; otherwise it exits 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOG=${1:-gpu_check.log}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')): nothing checked" >&2
    exit 1
fi

failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name" | tee -a "$LOG"
    local t0=$SECONDS
    # through bash -c, so that a step can be one of the exported shell functions below
    if timeout "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$LOG"; then
        echo "-- $name: ok ($((SECONDS - t0)) s)" | tee -a "$LOG"
    else
        echo "-- $name: FAILED ($((SECONDS - t0)) s)" | tee -a "$LOG"
        failed+=("$name")
    fi
}

: > "$LOG"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, \
{torch.cuda.device_count()} GPU(s), torch {torch.__version__}, CUDA {torch.version.cuda}')" | tee -a "$LOG"

step "device-generic tests on cuda" 240 env PALMKIT_TEST_DEVICE=cuda "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/infer/test_generate.py tests/infer/test_sampling.py tests/model/test_palm.py

cat > "$TMP/checkpoint.py" <<'EOF'
import sys
from pathlib import Path

from palmkit.model.checkpoint import save_checkpoint
from palmkit.model.palm import build_model, preset
from palmkit.model.tokenizer import train_tokenizer

root = Path(sys.argv[1])
tok = train_tokenizer(Path("README.md").read_text(encoding="utf-8").splitlines(), root / "tok.model", vocab_size=400)
model = build_model(preset("tiny", vocab_size=tok.vocab_size), seed=0)
model.embed_tokens.weight.data.mul_(0.05)  # small embeddings: a varied greedy text
save_checkpoint(root / "ckpt", model.eval(), tok)
EOF
"$PY" "$TMP/checkpoint.py" "$TMP" >> "$LOG" 2>&1
CKPT=$TMP/ckpt

seeded() {
    "$PY" -m palmkit.cli generate --checkpoint "$CKPT" --prompt "The model" --sampling.max_new_tokens 24 \
        --sampling.temperature 0.9 --sampling.seed 7 --device cuda
}
sampled_twice() {
    local a b
    a=$(seeded) && b=$(seeded) && echo "$a" && [ "$a" = "$b" ] && echo "the same text twice"
}
export PY CKPT
export -f seeded sampled_twice
step "seeded sampled generation on cuda" 120 sampled_twice

cat > "$TMP/mfu.py" <<'EOF'
import os
import time

import torch

from palmkit.model.palm import build_model, preset
from palmkit.train.step import compute_autocast, forward_backward, make_optimizer, optimizer_step

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; PEAK_TFLOPS overrides.
PEAKS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165, "3090": 71}
name = torch.cuda.get_device_name(0)
peak = float(os.environ.get("PEAK_TFLOPS") or next((v for k, v in PEAKS.items() if k in name), 0))
cfg = preset("base")
model = build_model(cfg, device="cuda", seed=0).train()
opt = make_optimizer(model, lr=3e-4)
batch, seq = 8, cfg.max_seq_len
x = torch.randint(3, cfg.vocab_size, (batch, seq + 1), device="cuda")
autocast = compute_autocast(torch.device("cuda"), torch.bfloat16)
times = []
for i in range(13):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = forward_backward(model, x[:, :-1], x[:, 1:], autocast)[0]
    optimizer_step(model, opt, 1.0)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
step = sorted(times[3:])[len(times[3:]) // 2]  # the median after 3 warm-up steps
tokens = batch * seq / step
flops = cfg.flops_per_token(seq) * tokens
print(f"base preset, {model.num_params() / 1e6:.0f}M parameters, batch {batch} x {seq} tokens, bf16 autocast, eager")
print(f"step {step * 1000:.0f} ms (median of 10), {tokens:,.0f} tokens/s, {flops / 1e12:.1f} TFLOP/s, loss {loss:.3f}")
print(f"MFU {flops / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s ({name})" if peak else
      f"MFU: unknown peak for {name}; set PEAK_TFLOPS")
print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
EOF
step "base bf16 pretraining step, MFU" 180 "$PY" "$TMP/mfu.py"

cat > "$TMP/ddp.py" <<'EOF'
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from palmkit.model.palm import build_model, preset
from palmkit.train.distributed import init_distributed

d = init_distributed()
if not dist.is_initialized():  # a 1-process torchrun: init_distributed needs no group, this check does
    dist.init_process_group("nccl")
assert dist.get_backend() == "nccl", dist.get_backend()
cfg = preset("tiny")
x = torch.randint(3, cfg.vocab_size, (4, 65), device="cuda")
losses = {}
for name in ("plain", "ddp"):
    model = build_model(cfg, device="cuda", seed=0).train()
    net = DistributedDataParallel(model, device_ids=[0]) if name == "ddp" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses[name] = []
    for _ in range(3):
        loss = net(x[:, :-1], targets=x[:, 1:])[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses[name].append(loss.item())
print(losses)
assert all(abs(a - b) < 1e-5 for a, b in zip(losses["plain"], losses["ddp"])), "DDP changed the losses"
dist.destroy_process_group()
EOF
step "DDP over NCCL, one GPU" 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$TMP/ddp.py"

cat > "$TMP/ft_data.py" <<'EOF'
"""A `small` checkpoint and an easy two-class task (which animal a sentence of filler words mentions)."""
import csv
import random
import sys
from pathlib import Path

from palmkit.model.checkpoint import save_checkpoint
from palmkit.model.palm import build_model, preset
from palmkit.model.tokenizer import train_tokenizer

root, preset_name = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "small"
filler = "the a of and to in is was for on with as by at from this that which river city house garden".split()
lines = Path("README.md").read_text(encoding="utf-8").splitlines() + filler + ["fox", "dog"]
tok = train_tokenizer(lines, root / "ft_tok.model", vocab_size=400)
save_checkpoint(root / "ft_ckpt", build_model(preset(preset_name, vocab_size=tok.vocab_size), seed=0), tok)
rng = random.Random(0)
with open(root / "task.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["sentence", "animal"])
    for i in range(2000):
        words = [rng.choice(filler) for _ in range(40)]
        words.insert(rng.randrange(41), ("fox", "dog")[i % 2])
        w.writerow([" ".join(words), ("fox", "dog")[i % 2]])
EOF
cat > "$TMP/ft_report.py" <<'EOF'
"""One line of a fine-tuning run's figures from its metrics.jsonl; fails when the easy task was not learned."""
import json
import statistics
import sys

out, dtype, n = sys.argv[1:4]
records = [json.loads(line) for line in open(f"{out}/metrics.jsonl", encoding="utf-8")]
speeds = [r["examples_per_s"] for r in records if "examples_per_s" in r][2:]
accuracy = max(r["valid/accuracy"] for r in records if "valid/accuracy" in r)
print(f"finetune classify, {dtype}, {n} process(es): {statistics.median(speeds):,.0f} examples/s "
      f"(median step), valid accuracy {accuracy:.3f}")
assert accuracy >= 0.9, "the easy task was not learned"
EOF
finetune_ddp() {
    local n dtype out
    n=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
    "$PY" "$TMP/ft_data.py" "$TMP" small || return 1
    for dtype in float32 bfloat16; do
        out=$TMP/ft-$dtype
        "$PY" -m torch.distributed.run --standalone --nproc_per_node="$n" -m palmkit.cli finetune classify \
            --checkpoint "$TMP/ft_ckpt" --out "$out" --data.train_file "$TMP/task.csv" --data.text_field sentence \
            --data.label_field animal --device cuda --train.dtype "$dtype" --train.epochs 2 --train.batch_size 64 \
            --train.lr 1e-3 --train.log_every 1 > /dev/null || return 1
        "$PY" "$TMP/ft_report.py" "$out" "$dtype" "$n" || return 1
    done
}
export TMP
export -f finetune_ddp
step "fine-tuning, DDP over the GPUs present, float32 and bfloat16" 300 finetune_ddp

cat > "$TMP/tp.py" <<'EOF'
import torch

from palmkit.infer.generate import generate_ids
from palmkit.infer.sampling import SamplingParams
from palmkit.infer.tensor_parallel import tensor_parallel
from palmkit.model.palm import build_model, preset
from palmkit.train.distributed import init_distributed

d = init_distributed()
prompts = [[1, 5, 6, 7, 8, 9], [1, 50], [1, 7, 90, 7, 200]]
greedy = SamplingParams(max_new_tokens=16, temperature=0, stop_at_eos=False)
for vocab_parallel in (False, True):
    models = [build_model(preset("tiny", n_kv_heads=2), device="cuda", seed=0).eval() for _ in range(2)]
    split = tensor_parallel(models[1], d, vocab_parallel)  # a 1-rank NCCL mesh: the code path, on the GPU
    with torch.inference_mode():
        want, got = list(generate_ids(models[0], prompts, greedy)), list(generate_ids(split, prompts, greedy))
        x = torch.tensor([prompts[0]], device="cuda")
        diff = (split(x) - models[0](x)).abs().max().item()
    print(f"vocab_parallel={vocab_parallel}: greedy {'equal' if got == want else 'DIFFERENT'}, max logit diff {diff:.2e}")
    assert got == want and diff < 1e-4
EOF
step "tensor-parallel generation on one GPU" 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    "$TMP/tp.py"

if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    tp_two() {
        local one two args=(generate --checkpoint "$CKPT" --prompt "The model" --sampling.max_new_tokens 24
                                   --sampling.temperature 0)
        one=$("$PY" -m palmkit.cli "${args[@]}" --device cuda) &&
        two=$("$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m palmkit.cli "${args[@]}" --tp 2) &&
        echo "$two" && [ "$one" = "$two" ] && echo "TP=2 over NCCL gives the one-GPU text"
    }
    export -f tp_two
    step "palmkit generate --tp 2 over NCCL" 120 tp_two
fi

if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: every step passed (log: $LOG)"
else
    echo "gpu_check: FAILED: ${failed[*]} (log: $LOG)"
    exit 1
fi
