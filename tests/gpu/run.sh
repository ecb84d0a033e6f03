#!/usr/bin/env bash
# GPU checks, for a machine with an NVIDIA GPU (the device tool): about 5 minutes on an H200.
#   1. the engine's greedy tokens equal stock transformers' on CUDA (every architecture, budget, policy)
#   2. the seed suite, measured, on a synthetic model whose experts overflow the budget
#   3. overlap: hit work on the GPU and miss work on the CPU run at the same time
# Results land in ${OUT:-out}/ (JSON + PNG). Usage: bash tests/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q --upgrade pip
  .venv-gpu/bin/pip install -q torch  # the CUDA build
  .venv-gpu/bin/pip install -q -e ".[test]"
fi
. .venv-gpu/bin/activate
python - <<'PY'
import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())
PY
MOE_CHAT_THREADS=${MOE_CHAT_THREADS:-8} timeout 240 python -m pytest -q tests/engine/test_equivalence.py -k cuda \
  --junitxml="$OUT/equivalence.xml" | tee "$OUT/equivalence.txt"
timeout 200 python tests/gpu/overlap.py | tee "$OUT/overlap.json"
for b in 0 0.25 0.5 1; do
  timeout 120 python -m engine generate --model "$OUT/synthetic" --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 48 \
    --device cuda --budget "$b" --json > "$OUT/generate-$b.json" 2>/dev/null || true
done
timeout 300 python -m engine bench --suite seed --model "$OUT/synthetic" --policies lru,decay,predictive \
  --chart "$OUT/seed.png" --json > "$OUT/seed.json"
python - "$OUT" <<'PY'
import json, sys, glob
out = sys.argv[1]
for f in sorted(glob.glob(f"{out}/generate-*.json")):
    try:
        s = json.load(open(f))["stats"]
        print(f, f"hit rate {s['hit_rate']:.2f}", f"decode {s['decode_tokens_per_s']:.1f} tok/s")
    except Exception as e:
        print(f, "failed", e)
PY
