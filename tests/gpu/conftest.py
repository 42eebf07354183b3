"""The gpu tier's shared runs (built once per session, only when a gpu test runs: without CUDA every
test here is skipped before any fixture is made, tests/conftest.py)."""
from __future__ import annotations

import pytest
from gpuutil import RUN, SMALL, build_llama, job, run_worker, write_rte


@pytest.fixture(scope="session")
def rte(tmp_path_factory):
    return write_rte(tmp_path_factory.mktemp("rte") / "RTE")


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory, rte):
    return build_llama(tmp_path_factory.mktemp("llama") / "model", rte, **SMALL)


@pytest.fixture(scope="session")
def cpu_reference(tmp_path_factory, small_llama, rte):
    """The same job on the CPU in fp32 (hf backend): what the GPU runs are compared with. The reference
    splice (the same bits as the fused one, tests/unit/test_splice_op.py): no C++ build on the GPU machine."""
    d = tmp_path_factory.mktemp("cpu_ref")
    return run_worker(job(small_llama, rte, d / "out", "--dtype", "float32", "--splice", "reference", *RUN),
                      d / "rec.json", cpu=True)


@pytest.fixture(scope="session")
def hf_bf16(tmp_path_factory, small_llama, rte):
    """The hf backend on one GPU: bf16 backbone, fp32 encoder, recompute, packing."""
    d = tmp_path_factory.mktemp("hf_bf16")
    return run_worker(job(small_llama, rte, d / "out", "--dtype", "bfloat16", *RUN), d / "rec.json")
