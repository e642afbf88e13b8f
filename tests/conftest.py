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
    default 2 torch threads, 11.2 s with 1). Results do not depend on it: every comparison the tests make runs in
    one process, under one setting."""
    threads = _threads_per_worker()
    if threads is None or os.environ.get("CARSAM_TEST_THREADS") == "default":
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))    # subprocesses (CLI runs) inherit it
    import torch

    torch.set_num_threads(threads)
    if os.environ.get("CARSAM_TEST_ORT_THREADS") == "0":
        return
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
# `make test` runs `pytest -n 2 --dist loadgroup --no-loadscope-reorder`: the scheduler hands out one group of
# tests at a time, in collection order, to whichever worker runs out of work. Below: (1) the tests of one module
# form one group (their module fixtures and cached exports are built once, in one worker), except tests marked
# slow, which are each their own unit unless they carry an explicit xdist_group (then they share what that group
# builds); (2) the costliest units come first, so that the two workers never end on one long test while the other
# idles. Costs: CPU seconds per test on the 2-core CI machine, 2026-12-02, exports included where the test is
# the first to need them (docs/benchmarks.md, "CI time").
FIRST = (
    "@large_encoders",                           # vit_l and vit_h encoder exports (minutes, 1.2 / 2.5 GB)
    "tests/eval/test_runner_vit_b.py",           # 4 vit_b exports + 3 evaluations at 1024 px
    "tests/calib/test_mac.py",                   # reference decoder + tiny full model MAC runs
    "tests/test_quantize.py::test_w8a8_minmax_vit_b_full",
    "tests/test_quantize.py::test_w4_file_size_vit_b",
    "tests/test_reference_model.py",             # SamPredictor over 20 images
    "tests/calib/recon/",                        # reconstruction runs, 30-50 s each
    "tests/test_determinism.py",
    "tests/eval/test_runtime_parity_reference.py",
    "tests/test_export.py",
    "tests/passes/test_attention.py",
    "tests/torchexec/test_sam_conformance.py",
    "tests/deploy/test_deploy_cli.py",
)


def _rank(item) -> tuple[int, int]:
    key = item.nodeid + "".join(f"@{m.args[0]}" for m in item.iter_markers("xdist_group") if m.args)
    for i, pattern in enumerate(FIRST):
        if pattern in key:
            return i, 0
    return len(FIRST), 0 if item.get_closest_marker("slow") else 1


@pytest.hookimpl(tryfirst=True)    # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=_rank)   # stable: file order within a rank
