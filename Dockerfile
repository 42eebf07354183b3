# ptuning-dist for GPU clusters: the frozen-backbone P-tuning launchers on an official CUDA PyTorch.
#
#   docker build -t ptuning-dist:0.1.0 .
#   docker run --rm --gpus all --ipc=host ptuning-dist:0.1.0 --output_dir runs/x ...   # train.py flags
#
# The entry point is `python launchers/train.py` (one process). For the other launchers, override it;
# the working directory is the source tree, so README's relative paths (ds_configs/...) work as they are:
#   docker run ... --entrypoint torchrun  ptuning-dist:0.1.0 --nproc_per_node 8 launchers/train.py --ds_config ds_configs/zero3.json
#   docker run ... --entrypoint deepspeed ptuning-dist:0.1.0 launchers/train.py --ds_config ds_configs/zero3.json
#   docker run ... --entrypoint mpirun    ptuning-dist:0.1.0 -np 8 python launchers/train.py --ds_config ds_configs/zero3.json
#   docker run ... --entrypoint python    ptuning-dist:0.1.0 launchers/evaluate.py ...   (or launchers/export.py)
# pyxis/enroot and `apptainer exec` do not run the entry point: they run the srun command line (see README).
#
# Base: the official image, pinned by exact tag (tests/unit/test_docker.py checks its torch against
# pyproject's torch>=2.6,<2.14). torch 2.13.0 is the release the test suite runs on CPU (dev.sh).
# CUDA 12.6, not 13.x: CUDA 13 needs an R580+ driver; 12.6 runs on the older drivers clusters keep.
# devel, not runtime: it has nvcc and the CUDA headers (CUDA_HOME), which DeepSpeed's JIT-built CUDA
# ops need; torch.utils.cpp_extension builds our splice kernel (ptuning_dist/ops/splice_cpu.cpp)
# and Triton compiles its launcher stubs with the host compiler.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-devel

ARG DEBIAN_FRONTEND=noninteractive

# g++ for those JIT builds (ninja comes from PyPI below). Not version-pinned (DL3008): Ubuntu's
# archive drops superseded patch versions, so a pin would break the build within weeks; the base
# tag fixes the release and the build is reproducible through the image itself.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# The non-root user the image runs as. uid 1000, the first user on most Linux machines: what it writes
# to a bind mount is then usually the host user's. Ubuntu 24.04 bases have `ubuntu` as 1000: it goes.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash ptuning

# The source tree (.dockerignore keeps out .venv, .git, runs/, caches and large local files).
COPY . /opt/ptuning-dist

# Install the package and its dependencies as pyproject.toml pins them (deepspeed and
# megatron-core ==; transformers and the rest by their ranges).
# - torch stays the base image's CUDA build: its exact installed version goes into a constraints
#   file, so the resolver can only keep it. pyproject's torch range alone would let pip swap in a
#   PyPI build whenever it resolved to another version; with the constraint such a conflict fails
#   the build instead. torch's own == pins (triton, nvidia-*) keep those too. The file stays in the
#   image for derived images: `pip install -c /etc/ptuning-dist/constraints.txt ...`.
# - no extras: the test extra's triton (a range up to CI's 3.9.0) is not needed in the image.
# - ninja: the C++ JIT builds (DeepSpeed ops, our splice kernel). mpich: mpi4py (a dependency: DeepSpeed's
#   rank discovery under mpirun) needs an MPI library at run time and the base image has none; the PyPI
#   wheel is the one the test suite runs with, and brings mpirun for `mpirun -np N` on one node. Across
#   nodes, use srun or torchrun (NCCL carries the traffic; MPI only tells ranks apart).
#   Both pinned to the versions the test suite runs with, inside the test extra's ranges.
RUN mkdir -p /etc/ptuning-dist \
    && python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /etc/ptuning-dist/constraints.txt \
    && python -m pip install --no-cache-dir --constraint /etc/ptuning-dist/constraints.txt \
        ninja==1.13.2 mpich==5.0.2 /opt/ptuning-dist \
    && python -c "import ptuning_dist, deepspeed, transformers, megatron.core, mpi4py"

# Writable places for the user: runs/ (the default --output_dir; mount a volume there) and the JIT
# build cache (torch.utils.cpp_extension and DeepSpeed build into TORCH_EXTENSIONS_DIR; mount it to
# keep builds across containers). Mode 1777 as /tmp, so `docker run --user <another uid>` works too.
# Triton's cache is left at its default, $HOME/.triton: the user's home here, the host user's own
# under Apptainer (whose image is read-only) and pyxis.
ENV TORCH_EXTENSIONS_DIR=/home/ptuning/.cache/torch_extensions
RUN mkdir -p /opt/ptuning-dist/runs "$TORCH_EXTENSIONS_DIR" \
    && chown ptuning:ptuning /opt/ptuning-dist/runs "$TORCH_EXTENSIONS_DIR" /home/ptuning/.cache \
    && chmod 1777 /opt/ptuning-dist/runs "$TORCH_EXTENSIONS_DIR"

# numeric, so that a runtime can tell it is not root without the image's /etc/passwd
USER 1000:1000
WORKDIR /opt/ptuning-dist

# A batch job, not a service: nothing to probe.
HEALTHCHECK NONE

LABEL org.opencontainers.image.title="ptuning-dist" \
      org.opencontainers.image.description="Distributed P-tuning of frozen GPT backbones (DeepSpeed ZeRO-3, megatron-core TP/PP)" \
      org.opencontainers.image.version="0.1.0"

ENTRYPOINT ["python", "/opt/ptuning-dist/launchers/train.py"]
CMD ["--help"]
