#!/usr/bin/env bash
# The one prepared GPU script: the quick GPU benchmark (aimed at ≤ 5 min on one H100/H200, not
# yet measured: no GPU was available when it was written), then, with
# FULL=1, the full one. Runs with the machine's own python3 (torch, transformers, peft,
# safetensors, tokenizers, h5py installed; no project venv) from the repository root:
#
#     bash bench/gpu.sh                 # results and logs in $OUT (default runs/gpu)
#     FULL=1 bash bench/gpu.sh          # then the full bench (contexts 512 and 768, all modes)
#
# The evaluate.py end-to-end row needs the Qwen2 tokenizer.json, which the GPU machine cannot
# build (the test extras are not there): write it first where the tests run, and send it along:
#     .venv/bin/python -c "from tools.checkpoints import write_qwen2_tokenizer as w; \
#         w('runs/gpu-inputs/tokenizer.json')"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
CACHE=${CACHE:-$HOME/.cache/qwen-min/bench}
TOKENIZER=${TOKENIZER:-runs/gpu-inputs/tokenizer.json}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
# compiled kernels outlive the process: the full bench after the quick one compiles less
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/qwen-min/inductor}
LOG="$OUT/gpu.log"

{
  echo "== $(date -u) $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$LOG"

tok=()
[ -f "$TOKENIZER" ] && tok=(--tokenizer "$TOKENIZER")
echo "== quick bench" | tee -a "$LOG"
timeout 480 python3 bench/bench.py --device cuda --quick --wait-idle 5 --retries 0 \
  --cache "$CACHE" "${tok[@]}" --out "$OUT/results-gpu-quick.md" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "== quick bench exit $status" | tee -a "$LOG"

if [ "${FULL:-0}" = 1 ]; then
  echo "== full bench" | tee -a "$LOG"
  python3 bench/bench.py --device cuda --wait-idle 5 --retries 0 --cache "$CACHE" \
    "${tok[@]}" --out "$OUT/results-gpu.md" 2>&1 | tee -a "$LOG"
  echo "== full bench exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi
exit "$status"
