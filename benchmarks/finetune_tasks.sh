#!/usr/bin/env bash
# Fine-tuning measurements: one pretrained checkpoint fine-tuned on the built-in tasks, each
# evaluated on its test split beside its baseline. Training sets are subsampled (--train.max_train) so that each
# run takes a few minutes on 2 CPU cores. The numbers land in $OUT/*/eval/report.{md,json}.
#
#   PRE=runs/ft-pretrain/final bash benchmarks/finetune_tasks.sh
#
# Without a pretrained checkpoint, make one first (stand-in corpus, ~10 min of CPU):
#   python benchmarks/finetune_corpus.py --out runs/ft-corpus
#   palmkit pretrain --data runs/ft-corpus --out runs/ft-pretrain --train.preset tiny --train.seq_len 128 \
#       --train.batch_tokens 8192 --train.micro_batch 32 --train.max_steps 450 --train.max_minutes 10 \
#       --train.warmup_steps 30 --train.lr 3e-3 --train.dtype float32
set -euo pipefail
cd "$(dirname "$0")/.."
PRE=${PRE:-runs/ft-pretrain/final}
OUT=${OUT:-runs/ft}
# Tiny models on a shared 2-core machine: one thread avoids OpenMP threads spin-waiting on each other.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PK=.venv/bin/palmkit
COMMON=(--train.epochs 4 --train.batch_size 16 --train.patience 2)

run() {  # name, starting checkpoint, then finetune arguments
  local name=$1 start=$2; shift 2
  [ -f "$OUT/$name/config.json" ] && [ -z "${FORCE:-}" ] && { echo "skip $name (done)"; return; }
  "$PK" finetune "$@" --checkpoint "$start" --out "$OUT/$name" > "$OUT/$name.summary.json"
}
mkdir -p "$OUT"
# The same architecture and tokenizer, randomly initialised: what pretraining adds
.venv/bin/python -c "
import sys; from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
from palmkit.model.palm import build_model
m, tok, _ = load_checkpoint(sys.argv[1]); save_checkpoint(sys.argv[2], build_model(m.config, seed=0), tok)" \
  "$PRE" "$OUT/scratch-init"
run sentiment-en "$PRE" classify --data.task sentiment-en --train.max_len 64 "${COMMON[@]}"
run sentiment-en-lora "$PRE" classify --data.task sentiment-en --train.max_len 64 "${COMMON[@]}" --train.lora_rank 8 \
  --train.lora_targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
run sentiment-en-lora-qv "$PRE" classify --data.task sentiment-en --train.max_len 64 "${COMMON[@]}" --train.lora_rank 8 \
  --train.lora_targets q_proj,v_proj
run sentiment-en-scratch "$OUT/scratch-init" classify --data.task sentiment-en --train.max_len 64 "${COMMON[@]}"
run tweets-en "$PRE" classify --data.task tweets-en --train.max_len 64 --train.max_train 6000 "${COMMON[@]}" \
  --train.epochs 3
run sentiment-zh "$PRE" classify --data.task sentiment-zh --train.max_len 128 --train.max_train 5000 "${COMMON[@]}" \
  --train.epochs 3
# Taggers need a larger step than the default 3e-4 on a model this small (valid F1 0.04 -> 0.16 on ner-en)
NER=(--train.lr 2e-3 --train.batch_size 16 --train.patience 3)
run ner-en "$PRE" ner --data.task ner-en --train.max_len 64 "${NER[@]}" --train.epochs 10
run ner-en-echo "$PRE" ner --data.task ner-en --train.max_len 128 --context echo "${NER[@]}" --train.epochs 10
run ner-zh "$PRE" ner --data.task ner-zh --train.max_len 96 --train.max_train 3000 "${NER[@]}" --train.epochs 4

"$PK" evaluate --checkpoint "$OUT/sentiment-en" --eval_tasks sentiment-fr,sentiment-de,sentiment-zh > /dev/null
for name in sentiment-en-lora sentiment-en-lora-qv sentiment-en-scratch tweets-en sentiment-zh ner-en ner-en-echo ner-zh; do
  "$PK" evaluate --checkpoint "$OUT/$name" > /dev/null
done
.venv/bin/python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for summary in sorted(out.glob("*.summary.json")):
    name = summary.name.removesuffix(".summary.json")
    report = json.loads((out / name / "eval" / "report.json").read_text())
    fit = json.loads(summary.read_text())
    for task, e in report["tasks"].items():
        m, b = e["model"], e.get("baseline", {})
        if "accuracy" in m:
            print(f"| {name} | {task} | {e['examples']} | acc {m['accuracy']:.3f} / F1 {m['macro_f1']:.3f} | "
                  f"acc {b['accuracy']:.3f} / F1 {b['macro_f1']:.3f} | {fit['seconds']:.0f} s | {fit['trainable_params']:,} |")
        else:
            print(f"| {name} | {task} | {e['examples']} | entity F1 {m['micro']['f1']:.3f} | "
                  f"entity F1 {b['micro']['f1']:.3f} | {fit['seconds']:.0f} s | {fit['trainable_params']:,} |")
EOF
