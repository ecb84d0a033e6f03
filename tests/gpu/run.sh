#!/usr/bin/env bash
# GPU checks, for a machine with an NVIDIA GPU (the device tool): about 4 minutes on an H200.
#   1. the engine's greedy tokens equal stock transformers' on CUDA (every architecture, budget, policy)
#   2. overlap: hit work on the GPU and miss work on the CPU run at the same time
#   3. a generation through the CLI on CUDA, on a synthetic bf16 model whose experts overflow the budget
#   4. the seed suite, every row measured, on that model
#   5. decode with every expert cached against stock transformers on the GPU: the engine's host cost per layer
# Every check runs even when an earlier one fails; the exit status says whether all passed.
# Results land in ${OUT:-out}/. Needs a Python with CUDA torch and the project's dependencies
# (PYTHON, default python3); the project runs from this checkout, uninstalled.
# Usage: bash tests/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}
MODEL=${MOE_CHAT_GPU_MODEL:-/tmp/moe-synthetic}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
failed=()

check() {  # check NAME COMMAND...: run it, note a failure, go on
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@" || failed+=("$name")
  echo "== $name: $((SECONDS - start)) s"
}

$PY -c 'import torch, transformers, os
assert torch.cuda.is_available(), "no CUDA GPU"
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(),
      os.cpu_count(), "CPUs")' || exit 2
check equivalence timeout 240 $PY -m pytest -q -p no:cacheprovider tests/engine/test_equivalence.py -k cuda
check overlap sh -c "timeout 200 $PY tests/gpu/overlap.py '$MODEL' > '$OUT/overlap.json'"
cat "$OUT/overlap.json"
check generate sh -c "timeout 120 $PY -m engine generate --model '$MODEL' --prompt-ids 1,2,3,4,5,6,7,8 \
  --max-new-tokens 32 --device cuda --budget 0.25 --json > '$OUT/generate.json'"
check seed sh -c "timeout 300 $PY -m engine bench --suite seed --model '$MODEL' --policies lru,predictive \
  --max-new-tokens 24 --chart '$OUT/seed.png' --json > '$OUT/seed.json'"
check decode-overhead sh -c "timeout 150 $PY tests/gpu/decode_overhead.py '$MODEL' > '$OUT/decode_overhead.json'"
cat "$OUT/decode_overhead.json"
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
try:
    s = json.load(open(f"{out}/generate.json"))["stats"]
    print(f"generate: hit rate {s['hit_rate']:.2f}, decode {s['decode_tokens_per_s']:.1f} tok/s")
except Exception as e:
    print("generate: no stats:", e)
PY
[ ${#failed[@]} -eq 0 ] && echo "all GPU checks passed" || { echo "failed: ${failed[*]}"; exit 1; }
