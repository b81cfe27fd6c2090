#!/usr/bin/env bash
# make demo: the whole pipeline offline (simulate → train → evaluate → compare → FLOP ledger)
# on a TINY RANDOM-WEIGHT Qwen2 checkpoint with the real Qwen2 vocabulary. Everything lands in
# runs/demo/ (removed and rebuilt on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
D=runs/demo
banner() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }

banner "qwen-min demo: this is a TINY RANDOM model (hidden 64, 2 layers), NOT Qwen2.5-0.5B"
echo "It only shows every part running offline; its forecasts mean nothing."
echo "For the real model: make train / make eval (needs the Hugging Face download or --model PATH)."
rm -rf "$D"
start=$(date +%s)

banner "1/6 tiny checkpoint (config.json + model.safetensors + real Qwen2 tokenizer.json)"
$PY tools/checkpoints.py "$D/tiny-qwen2"

banner "2/6 simulated Lotka-Volterra data"
$PY data.py --out "$D/lotka_volterra_data.h5" --systems 200 --seed 0

COMMON=(--model "$D/tiny-qwen2" --data "$D/lotka_volterra_data.h5" --ledger "$D/ledger.jsonl")
banner "3/6 LoRA training (150 steps, context 128; a high lr, because the model starts random)"
$PY train.py "${COMMON[@]}" --out "$D/train" --steps 150 --context-length 128 --stride 128 \
    --lr 2e-2 --targets q_proj,v_proj,o_proj,down_proj --eval-every 50 --checkpoint-every 50

banner "4/6 evaluation of the untrained model (30 validation series, 10 forecast steps)"
$PY evaluate.py "${COMMON[@]}" --out "$D/eval-untrained" --limit 30 --batch-size 30

banner "5/6 evaluation with the trained adapter"
$PY evaluate.py "${COMMON[@]}" --adapter "$D/train/adapter" --out "$D/eval-lora" --limit 30 \
    --batch-size 30
$PY evaluate.py --compare "$D/eval-untrained" "$D/eval-lora" --out "$D/compare"

banner "6/6 FLOP ledger against the 1e17 budget"
$PY flops.py --ledger "$D/ledger.jsonl" | tail -n 8

banner "done in $(( $(date +%s) - start )) s; files written:"
find "$D" -type f -not -path "*/tiny-qwen2/*" | sort
