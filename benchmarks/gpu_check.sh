#!/usr/bin/env bash
# One run on a machine with a CUDA GPU: the CUDA tests and the four GPU benchmarks, about 15 minutes at most.
# Each step has its own time limit, so one that hangs does not eat the others; every step runs even if one fails.
# Results go to OUT_DIR (the first argument, else $OUT, else ./gpu-check): <step>.out (JSON for benchmarks),
# <step>.err (progress), summary.txt (exit code and seconds per step), figures.json (the README figures).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]      PYTHON=/path/to/python to choose the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without an editable install too
export PREFECT_HOME=${PREFECT_HOME:-$(mktemp -d)}    # the recipe benchmark's ephemeral Prefect server, not yours
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
status=0

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 started rc
  shift 2
  echo "== $name (at most ${limit}s)"
  started=$(date +%s)
  timeout "$limit" "$@" >"$OUT_DIR/$name.out" 2>"$OUT_DIR/$name.err"
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - started))s" | tee -a "$OUT_DIR/summary.txt"
  if [ "$rc" -ne 0 ]; then status=1; tail -n 20 "$OUT_DIR/$name.err"; fi
}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
  echo "no CUDA device here (or no torch for $PY): nothing to check" >&2
  exit 3
fi
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true
: >"$OUT_DIR/summary.txt"
step cuda_tests 180 "$PY" -m pytest -q -p no:cacheprovider -rs tests/learn/test_train_cuda.py
step bench_gpu_train 75 "$PY" benchmarks/bench_gpu_train.py --steps 20
step bench_gpu_train_e2e 150 "$PY" benchmarks/bench_gpu_train_e2e.py -n 2048 --workers 4 8
step bench_reference_recipe 210 "$PY" benchmarks/bench_reference_recipe.py
step bench_foundation 300 "$PY" benchmarks/bench_foundation.py --device cuda -n 512
tail -n 3 "$OUT_DIR/cuda_tests.out"
"$PY" - "$OUT_DIR" <<'PYTHON' | tee "$OUT_DIR/figures.json"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def last_json(name):
    try:
        return json.loads((out / f"{name}.out").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}
step, e2e, recipe = last_json("bench_gpu_train"), last_json("bench_gpu_train_e2e"), last_json("bench_reference_recipe")
try:  # bench_foundation prints indented JSON: the whole file is the object
    foundation = json.loads((out / "bench_foundation.out").read_text())
except (OSError, ValueError):
    foundation = {}
figures = {
    "device": step.get("device"),
    "model_step_images_per_s": {k: v.get("images_per_s") for k, v in step.get("variants", {}).items()},
    "e2e_end_to_end_images_per_s": e2e.get("end_to_end_images_per_s"),
    "e2e_model_step_images_per_s": e2e.get("model_step_images_per_s"),
    "e2e_ratio": e2e.get("ratio"),
    "e2e_naive_ratio": e2e.get("naive_ratio"),
    "recipe_s": recipe.get("recipe_s"),
    "naive_recipe_s": recipe.get("naive_recipe_s"),
    "foundation_embed_images_per_s": {k: v.get("embed_images_per_s") for k, v in foundation.get("backbones", {}).items()},
    "foundation_probe_retrain_s": {k: v.get("probe_retrain_s") for k, v in foundation.get("backbones", {}).items()},
    "resnet50_finetune_all_epoch_s": foundation.get("finetune", {}).get("finetune_all_epoch_s"),
}
print(json.dumps(figures, indent=2))
PYTHON
exit $status
