"""tools/bench_carsam.py: the thread budget keeps every process of a run inside the cores it is given."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_carsam  # noqa: E402


@pytest.mark.parametrize("cores,jobs,eval_jobs,eval_threads", [(16, 3, 4, 2), (16, 1, 2, 2), (2, 1, 1, 1),
                                                               (16, 8, 8, 2), (4, 2, 0, 0)])
def test_thread_budget_never_oversubscribes(cores, jobs, eval_jobs, eval_threads):
    q, ev = bench_carsam.thread_budget(cores, jobs, eval_jobs, eval_threads)
    assert q >= 1 and ev >= 1
    if jobs + eval_jobs * ev <= cores:        # enough cores for one thread each: the sum stays inside them
        assert jobs * q + eval_jobs * ev <= cores


def test_thread_budget_gives_quantize_the_cores_evaluation_leaves():
    assert bench_carsam.thread_budget(16, 3, 4, 2) == (2, 2)     # 16 - 8 = 8 left, 2 each for 3 processes
    assert bench_carsam.thread_budget(16, 1, 2, 2) == (12, 2)


def test_queue_order_keeps_seeds_innermost():
    by_variant = bench_carsam.queue_order(["recon", "carsam"], ["w4a4", "w3a3"], [1, 2], "variant")
    assert by_variant[:4] == [("recon", "w4a4", 1), ("recon", "w4a4", 2), ("recon", "w3a3", 1), ("recon", "w3a3", 2)]
    by_bits = bench_carsam.queue_order(["recon", "carsam"], ["w4a4", "w3a3"], [1, 2], "bits")
    assert by_bits[:4] == [("recon", "w4a4", 1), ("recon", "w4a4", 2), ("carsam", "w4a4", 1), ("carsam", "w4a4", 2)]
    assert sorted(by_variant) == sorted(by_bits) and len(by_bits) == 8


def test_probe_cells_never_take_the_default_keys(tmp_path):
    """A probe (--quantize-args) must carry a --tag, which goes into its reconstruction cells' keys and its
    quantize command; the mse cells (calibrator only) are shared with the default run."""
    from types import SimpleNamespace

    base = dict(device="cuda", recon_iters=None, jcar_pairing="mlp", num_calib=32)
    plain = SimpleNamespace(**base, tag=None, quantize_args=None)
    probe = SimpleNamespace(**base, tag="rl1e-2", quantize_args="--recon-round-lr 1e-2")
    assert bench_carsam.cell_key("recon", "w4a4", 1, plain) == "recon_w4a4_c1_gpu"
    assert bench_carsam.cell_key("recon", "w4a4", 1, probe) == "recon_w4a4_c1_gpu_rl1e-2"
    assert bench_carsam.cell_key("mse", "w4a4", 1, probe) == bench_carsam.cell_key("mse", "w4a4", 1, plain)
    cmd = bench_carsam.quantize_cmd(tmp_path / "fp.onnx", tmp_path / "m.onnx", "recon", "w4a4", 1, tmp_path, probe)
    assert cmd[-2:] == ["--recon-round-lr", "1e-2"]
    assert "--recon-round-lr" not in bench_carsam.quantize_cmd(tmp_path / "fp.onnx", tmp_path / "m.onnx", "mse",
                                                               "w4a4", 1, tmp_path, probe)
    with pytest.raises(SystemExit):
        bench_carsam.main(["--quantize-args", "--recon-iters 5", "--table-only", "--work-dir", str(tmp_path)])
    # the migrated calibrator baseline is a calibrator cell too: shared key, on the CPU, no pass-through
    assert bench_carsam.cell_key("mse+smooth", "w4a4", 1, probe) == "mse+smooth_w4a4_c1"
    cmd = bench_carsam.quantize_cmd(tmp_path / "fp.onnx", tmp_path / "m.onnx", "mse+smooth", "w4a4", 1, tmp_path, probe)
    assert "--smooth" in cmd and cmd[cmd.index("--device") + 1] == "cpu" and "--recon-round-lr" not in cmd
    from carsam_onnx.config import SMOOTH_ALPHA

    assert cmd[cmd.index("--smooth") + 1] == f"{SMOOTH_ALPHA:g}"          # the default's alpha, not a copy of it


def test_cells_made_under_other_method_defaults_are_not_read_back(monkeypatch):
    """The method defaults' digest (part of every reconstruction cell's fingerprint, kept beside its model) is
    stable and changes when a default does: a cell cached before MAC's lambda changed is not reused."""
    from dataclasses import dataclass

    from carsam_onnx.config import MacConfig

    digest = bench_carsam.method_defaults()
    assert digest == bench_carsam.method_defaults() and len(digest) == 16

    @dataclass(frozen=True)
    class EarlierMac(MacConfig):
        lam_rel: float = 10.0

    monkeypatch.setattr(bench_carsam, "MacConfig", EarlierMac)
    assert bench_carsam.method_defaults() != digest


def test_fp_only_scores_the_fp_model_once_for_the_runs_that_follow(tmp_path):
    """--fp-only: only the FP cells are made (no quantization, no table written), and a later run in the same
    work dir reads them back instead of evaluating FP again (the tiny SAM, 2 validation images)."""
    from tiny_sam import tiny_sam_paths

    model, work, md = str(tiny_sam_paths()["full"]), tmp_path / "w", tmp_path / "out.md"
    common = ["--model", model, "--work-dir", str(work), "--val-seeds", "2", "--num-val", "2", "--out-md", str(md)]
    assert bench_carsam.main(["--fp-only", *common]) == 0
    assert sorted(p.name for p in (work / "cells").iterdir()) == ["fp_v2.json"] and not md.exists()
    assert not list((work / "models").glob("*.onnx"))
    stamp = (work / "cells" / "fp_v2.json").stat().st_mtime_ns
    assert bench_carsam.main(["--variants", "mse", "--calib-seeds", "1", "--bits", "w8a8", *common]) == 0
    assert (work / "cells" / "fp_v2.json").stat().st_mtime_ns == stamp          # read back, not evaluated again
    assert (work / "cells" / "mse_w8a8_c1_v2.json").is_file() and "### Validation seed 2 (FP " in md.read_text()


def test_a_quantize_phase_writes_no_table_and_its_sharing_reaches_the_later_one(tmp_path):
    """--phase quantize scores nothing, so it must not replace the last table with dashes; how many quantize
    processes its run allowed at once (--jobs) is kept beside each model and named by the --phase eval run's table."""
    from tiny_sam import tiny_sam_paths

    model, work, md = str(tiny_sam_paths()["full"]), tmp_path / "w", tmp_path / "out.md"
    common = ["--model", model, "--work-dir", str(work), "--val-seeds", "2", "--num-val", "2", "--out-md", str(md),
              "--variants", "mse", "--calib-seeds", "1", "--bits", "w8a8"]
    assert bench_carsam.main(["--phase", "quantize", "--jobs", "2", *common]) == 0
    assert not md.exists() and not list((work / "cells").iterdir())
    assert (work / "models" / "mse_w8a8_c1.jobs").read_text() == "2"
    assert bench_carsam.main(["--phase", "eval", "--jobs", "1", *common]) == 0
    assert "(s; up to 2 processes at once)" in md.read_text()


def test_sharing_names_what_was_recorded():
    assert bench_carsam._sharing({2}) == "up to 2 processes at once"
    assert bench_carsam._sharing({1, 6}) == "up to 1-6 processes at once"
    assert bench_carsam._sharing({2, None}) == "up to 2 processes at once where recorded"
    assert bench_carsam._sharing({None}) == "processes at once: not recorded"
