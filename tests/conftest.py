import os
import sys
from pathlib import Path

import pytest

# Test helper modules (sam_models.py, ...) live beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _threads_per_worker() -> int | None:
    """Under pytest-xdist (`make test`: -n 2), the CPUs this process may use divided among the workers; None when
    the tests run in one process."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 2:
        return None
    return max(1, len(os.sched_getaffinity(0)) // workers)


def pytest_configure(config):
    """One compute thread per worker when pytest -n 2 runs on a 2-core machine. torch and ONNX Runtime otherwise
    start a thread per core in every worker; on 2 cores two workers then run 4 spinning threads, and the spinning
    roughly doubles the CPU time of a test (measured 2026-12-02: a tiny-SAM reconstruction test 23.1 s CPU with the
    default 2 torch threads, 11.2 s with 1). Subprocesses inherit OMP_NUM_THREADS; the byte-for-byte comparisons
    between processes (tests/test_determinism.py) hold under it. CARSAM_TEST_THREADS=default keeps the libraries'
    defaults (for comparison)."""
    threads = _threads_per_worker()
    if threads is None or os.environ.get("CARSAM_TEST_THREADS") == "default":
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))    # subprocesses (CLI runs) inherit it
    import torch

    torch.set_num_threads(threads)
    _default_ort_threads(threads)


def _default_ort_threads(threads: int) -> None:
    """ONNX Runtime sessions opened without an explicit intra-op thread count get `threads` (ORT has no
    environment variable for it)."""
    import onnxruntime as ort

    init = ort.InferenceSession.__init__

    def __init__(self, path_or_bytes, sess_options=None, *args, **kwargs):
        if sess_options is None:
            sess_options = ort.SessionOptions()
        if sess_options.intra_op_num_threads == 0:
            sess_options.intra_op_num_threads = threads
        init(self, path_or_bytes, sess_options, *args, **kwargs)

    ort.InferenceSession.__init__ = __init__


# --------------------------------------------------------------------------------------- scheduling under xdist
# `make test` runs `pytest -n 2 --dist loadgroup --no-loadscope-reorder`: the scheduler hands out one unit of
# tests at a time, in collection order, to whichever worker runs low on work. (1) A unit is a module (its module
# fixtures and the exports it caches are built once, in one worker), except the long independent tests in SOLO,
# each its own unit, and the vit_l / vit_h encoder tests of two modules, one unit (each export once, never two
# at once). The units are set here, not with xdist_group marks: pytest-xdist 3.8 tags marked tests by setting
# item._nodeid, which pytest 9 no longer reads, so the marks are not honoured. (2) The costliest units come first
# (FIRST), so that the two workers do not end on one long test while the other idles. Costs: CPU seconds on the
# 2-core CI machine, 2026-12-02 (docs/benchmarks.md, "CI time").
FIRST = (
    "large_encoders",                            # vit_l and vit_h encoder exports (minutes, 1.2 / 2.5 GB)
    "tests/eval/test_runner_vit_b.py",           # 4 vit_b exports + 3 evaluations at 1024 px
    "tests/calib/test_mac.py",                   # reference decoder + tiny full model MAC runs
    "tests/test_quantize.py::test_w8a8_minmax_vit_b_full",
    "tests/test_quantize.py::test_w4_file_size_vit_b",
    "tests/test_reference_model.py",             # SamPredictor over 20 images
    "tests/calib/recon/",                        # reconstruction runs
    "tests/test_determinism.py",
    "tests/eval/test_runtime_parity_reference.py",
    "tests/test_export.py",
    "tests/passes/test_attention.py",
    "tests/torchexec/test_sam_conformance.py",
    "tests/deploy/test_deploy_cli.py",
)
SOLO = (
    "tests/test_quantize.py::test_w8a8_minmax_vit_b_full",
    "tests/test_quantize.py::test_w4_file_size_vit_b",
    "tests/calib/test_mac.py::test_mac_on_a_full_tiny_sam",
    "tests/test_determinism.py::",
    "tests/calib/recon/test_recon_reference.py::",
    "tests/torchexec/test_sam_conformance.py::test_vit_b_encoder",
    "tests/passes/test_emit_qdq.py::test_vit_b_encoder_w4",
)


def _unit(nodeid: str) -> str:
    if "::test_large_encoders" in nodeid:
        return "large_encoders"
    if nodeid.startswith(SOLO):
        return nodeid
    return nodeid.split("::")[0]


def _rank(item) -> tuple[int, int]:
    key = item.nodeid + "@" + _unit(item.nodeid)
    for i, pattern in enumerate(FIRST):
        if pattern in key:
            return i, 0
    return len(FIRST), 0 if item.get_closest_marker("slow") else 1


def pytest_collection_modifyitems(config, items):
    items.sort(key=_rank)   # stable: file order within a rank


@pytest.hookimpl(tryfirst=True, optionalhook=True)    # before xdist's own choice; absent without xdist
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return Units(config, log)
