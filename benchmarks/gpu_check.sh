#!/usr/bin/env bash
# shellcheck disable=SC2329  # the step functions run through `bash -c` (export -f), not by name
# The GPU check (README, "GPU check (H200)"): one command on the bare GPU machine, from the repo root.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh       # on the GPU machine, gpu_wheels/ carried
#   GPU_CHECK_DRY=1 OUT=/tmp/gpu_dry bash benchmarks/gpu_check.sh   # on a CPU: the steps that need no CUDA
#
# Steps, each under `timeout` within one budget (GPU_CHECK_BUDGET_S, default 450 s: under 8 minutes),
# each logged to $OUT/<step>.log and summarised in $OUT/summary.txt; a failed step does not stop the
# later ones (except the environment: nothing runs without it); exit 1 if any step failed.
#   env       a venv (GPU_VENV, default /tmp/ptuning_gpu_venv) over the image's Python with its site
#             packages (the image's torch, Triton, transformers, peft), then the carried wheels
#             (gpu_wheels/, benchmarks/prepare_gpu_wheels.sh) installed from that folder alone (no
#             index): DeepSpeed, megatron-core and whatever else the image lacks. The package itself
#             runs from the tree (PYTHONPATH), not installed: its pins are not resolved here.
#   versions  what the run used: $OUT/versions.json (and nvidia-smi's report)
#   wheels    (dry run only) every carried wheel installs for CPython 3.12 on x86_64 Linux
#   gpu_tier  pytest -m gpu over tests/gpu (dry run: collected, then skipped with the reason);
#             JUnit XML in $OUT/gpu_tier.xml, the tests' own records under $OUT/gpu_tier/
#   bench     benchmarks/gpu_bench.py: the Triton splice vs the reference, the bf16 matmul rate, and
#             the RTE job on a ~1B LLaMA-shaped model, ours and PEFT's P_TUNING (dry run:
#             --device cpu --tiny); results in $OUT/bench/ (gpu_bench.json, gpu_bench.md)
# Environment: OUT (default runs/gpu_check), GPU_PYTHON (the image's python3; dry run: .venv/bin/python),
# GPU_WHEELS (default gpu_wheels), GPU_VENV, GPU_CHECK_BUDGET_S, GPU_CHECK_DRY=1 (or --dry); for a
# rerun of part of it: GPU_CHECK_ONLY="gpu_tier bench" (the steps to run besides env; default all) and
# GPU_TIER_ARGS (more pytest arguments, e.g. "-k 'splice or zero3'").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
DRY=${GPU_CHECK_DRY:-0}
if [[ "${1:-}" == "--dry" ]]; then DRY=1; fi
if [[ "$DRY" == 1 && -z "${GPU_PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then
  GPU_PYTHON=$ROOT/.venv/bin/python
fi
BASE_PY=${GPU_PYTHON:-python3}
OUT=${OUT:-$ROOT/runs/gpu_check}
WHEELS=${GPU_WHEELS:-$ROOT/gpu_wheels}
if [[ "$DRY" == 1 ]]; then VENV=${GPU_VENV:-${TMPDIR:-/tmp}/ptuning_gpu_venv_dry}; else VENV=${GPU_VENV:-${TMPDIR:-/tmp}/ptuning_gpu_venv}; fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
START=$SECONDS
failed=0

export ROOT OUT WHEELS VENV BASE_PY DRY
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# JIT builds (only the CPU steps build one: the C++ splice of the dry run's CPU benchmark) outside the
# venv, which each run recreates: a dry run rebuilds nothing the last one built
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/ptuning_gpu_check_extensions}
export GPU_CHECK_OUT=$OUT/gpu_tier  # where the gpu tests write their records (tests/gpu/gpuutil.py)
export PY=$VENV/bin/python

# step NAME LIMIT RESERVE CMD...: CMD under `timeout`, at most LIMIT seconds and never into the last
# RESERVE seconds of the budget (kept for the steps after it); output to $OUT/NAME.log
step() {
  local name=$1 limit=$2 reserve=$3
  shift 3
  if [[ -n "${GPU_CHECK_ONLY:-}" && "$name" != env && " $GPU_CHECK_ONLY " != *" $name "* ]]; then
    echo "$name not run (GPU_CHECK_ONLY=$GPU_CHECK_ONLY)" | tee -a "$SUMMARY"
    return 0
  fi
  local left=$((BUDGET_S - (SECONDS - START) - reserve))
  if ((left < limit)); then limit=$left; fi
  if ((limit < 5)); then
    echo "$name SKIPPED: the budget is spent" | tee -a "$SUMMARY"
    failed=1
    return 0
  fi
  local t0=$SECONDS rc=0 status=ok
  echo "== $name (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT after ${limit}s"
  elif ((rc != 0)); then
    status="FAILED rc=$rc"
  fi
  echo "$name $status $((SECONDS - t0))s" | tee -a "$SUMMARY"
  if [[ "$status" != ok ]]; then
    failed=1
    tail -n 40 "$OUT/$name.log" || true
  fi
  return 0
}

make_env() {
  set -euo pipefail
  rm -rf "$VENV"
  echo "base interpreter: $BASE_PY ($("$BASE_PY" -c 'import sys; print(sys.version.split()[0], sys.prefix)'))"
  if ! "$BASE_PY" -m venv --system-site-packages "$VENV"; then
    echo "venv with pip failed (no ensurepip?): a venv without pip, driven by the base interpreter's pip"
    rm -rf "$VENV"
    "$BASE_PY" -m venv --system-site-packages --without-pip "$VENV"
  fi
  # a base interpreter that is itself a venv (or conda env): --system-site-packages would skip its
  # packages, so a .pth file adds its site folders after the new venv's own (carried wheels win)
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$BASE_PY" -c 'import site, sys
if sys.prefix != sys.base_prefix or "conda" in sys.version or "CONDA_PREFIX" in __import__("os").environ:
    print("\n".join(site.getsitepackages()))' >"$site/_image_site.pth"
  echo "image site folders added: $(tr '\n' ' ' <"$site/_image_site.pth")"
  local pip=("$VENV/bin/python" -m pip)
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then pip=("$BASE_PY" -m pip --python "$VENV/bin/python"); fi
  local req=(deepspeed==0.19.8 megatron-core==0.16.1 pytest accelerate protobuf)
  if [[ -f "$WHEELS/requirements.txt" ]]; then mapfile -t req <"$WHEELS/requirements.txt"; fi
  [[ -d "$WHEELS" ]] || { echo "error: no carried wheels at $WHEELS (benchmarks/prepare_gpu_wheels.sh; carry gpu_wheels)"; exit 1; }
  if ! "${pip[@]}" install --no-index --find-links "$WHEELS" "${req[@]}"; then
    # the resolver also checks what the image's own packages require (torch's setuptools, say): an
    # image that does not satisfy itself fails it. Then: the carried wheels the image has no version
    # of, plus DeepSpeed and megatron-core, without resolving
    echo "the resolving install failed: installing the carried wheels the image lacks with --no-deps"
    local wheels=()
    mapfile -t wheels < <("$VENV/bin/python" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, sys
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = w.name.split("-")[0]
    try:
        md.version(name)
        if name not in ("deepspeed", "megatron_core"):
            continue
    except md.PackageNotFoundError:
        pass
    print(w)
EOF
    )
    "${pip[@]}" install --no-index --no-deps "${wheels[@]}"
  fi
  "${pip[@]}" list 2>/dev/null | grep -Ei '^(torch|triton|deepspeed|megatron|transformers|peft|pytest|accelerate) ' || true
}

versions() {
  set -euo pipefail
  if command -v nvidia-smi >/dev/null; then nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true; fi
  "$PY" - <<'EOF'
import importlib, json, os, platform
import torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
       "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
               bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())))
for mod in ("triton", "deepspeed", "megatron.core", "transformers", "peft", "accelerate", "sentencepiece", "mpi4py",
            "numpy", "pytest", "ptuning_dist"):
    try:
        m = importlib.import_module(mod)
        out[mod] = getattr(m, "__version__", "?") + f" ({os.path.dirname(m.__file__)})"
    except Exception as e:  # recorded, not fatal here: the tier and the bench say what it breaks
        out[mod] = f"MISSING: {type(e).__name__}: {e}"
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ["OUT"], "versions.json"), "w"), indent=1)
EOF
}

wheel_tags() {  # dry run: each carried wheel installs for CPython 3.12 on x86_64 Linux
  set -euo pipefail
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  "$PY" -m pip install --no-index --no-deps --only-binary=:all: --target "$tmp" --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    "$WHEELS"/*.whl
  echo "installed for cp312: $(find "$tmp" -maxdepth 1 -name '*.dist-info' | wc -l) distributions"
}

gpu_tier() {
  set -euo pipefail
  mkdir -p "$GPU_CHECK_OUT"
  # the files in this order (the splice and the training runs first: what a timeout would cut is the
  # least needed), then any other test file of the tier
  local order=(test_splice_cuda.py test_train_cuda.py test_zero3_nccl.py test_sync_free.py test_memory_model_cuda.py)
  local files=() f
  for f in "${order[@]}"; do if [[ -f "tests/gpu/$f" ]]; then files+=("tests/gpu/$f"); fi; done
  for f in tests/gpu/test_*.py; do if [[ " ${files[*]} " != *" $f "* ]]; then files+=("$f"); fi; done
  local common=(-p no:cacheprovider -m gpu "${files[@]}") extra=()
  if [[ -n "${GPU_TIER_ARGS:-}" ]]; then eval "extra=($GPU_TIER_ARGS)"; fi
  if [[ "$DRY" == 1 ]]; then
    "$PY" -m pytest --collect-only -q "${common[@]}" "${extra[@]}"
    "$PY" -m pytest -q -rs "${common[@]}" --junitxml "$OUT/gpu_tier.xml" "${extra[@]}"  # all skipped, with the reason
  else
    "$PY" -m pytest -q -rA --durations=0 "${common[@]}" --junitxml "$OUT/gpu_tier.xml" "${extra[@]}"
  fi
}

bench() {
  set -euo pipefail
  local data=() mode=()
  if [[ -f "$WHEELS/data/fewglue/RTE/train.jsonl" ]]; then data=(--data_dir "$WHEELS/data/fewglue/RTE"); fi
  if [[ "$DRY" == 1 ]]; then mode=(--device cpu --tiny); fi
  "$PY" benchmarks/gpu_bench.py --out "$OUT/bench" "${mode[@]}" "${data[@]}"
}

export -f make_env versions wheel_tags gpu_tier bench
echo "gpu_check: dry=$DRY, out=$OUT, wheels=$WHEELS, venv=$VENV, budget ${BUDGET_S}s"
step env 120 200 bash -c make_env
if [[ "$failed" != 0 ]]; then
  echo "the environment failed: nothing else can run (see $OUT/env.log)" | tee -a "$SUMMARY"
  exit 1
fi
step versions 60 180 bash -c versions
if [[ "$DRY" == 1 ]]; then step wheels 60 150 bash -c wheel_tags; fi
step gpu_tier 230 130 bash -c gpu_tier
step bench 240 0 bash -c bench
echo "total $((SECONDS - START))s of ${BUDGET_S}s" | tee -a "$SUMMARY"
exit "$failed"
