"""Same seed, same bytes (issue 14, item 3): `data synth`, `export` (random init and the bundled reference
weights), `quantize` (every method, CPU) and the metrics of `eval --json`.

A job runs the commands into a folder, twice, in two processes with different PYTHONHASHSEED (so nothing may
depend on the order of string sets or on process state), and every file must be equal byte for byte; for
eval's JSON everything but the timings. The fast test uses the tiny test SAM for the random-init
export; the slow one runs `carsam-onnx export` on the whole reference model, from its weights and from random
init, and MSE's activation search.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_proc import _env

HERE = Path(__file__).resolve().parent
QUANTIZE = {  # every calibration method, with a spread of bit widths, targets and block sizes
    "minmax": ["--bits", "w8a8"],
    "percentile": ["--bits", "w4a8", "--target", "trt", "--percentile", "99.9", "--block-size", "16"],
    "mse": ["--bits", "w4a16"],      # MSE's per-channel weight clipping search (activations: the slow test)
}
TIMING_KEYS = ("timings", "per_image")


def _cli(*argv) -> None:
    from carsam_onnx.cli import main

    code = main(["-q", *map(str, argv)])
    assert code == 0, argv


def _job(out: Path, tiny: Path | None = None) -> None:
    """synth, tiny SAM random-init export (or a copy of `tiny`), quantize x3, eval."""
    import shutil

    from carsam_onnx.export.onnx_export import export_onnx
    from carsam_onnx.modelio import save_model
    from tiny_sam import _built

    out.mkdir()
    _cli("data", "synth", "-o", out / "synth", "--num-images", 3, "--seed", 7, "--image-size", 128)
    if tiny is None:
        save_model(export_onnx(_built(0), "full"), out / "tiny.onnx")      # random init, seed 0
    else:
        shutil.copy(tiny, out / "tiny.onnx")
    for method, extra in QUANTIZE.items():
        _cli("quantize", out / "tiny.onnx", "-o", out / f"tiny.{method}.onnx", "--method", method,
             "--calib-images", out / "synth", "--num-calib", 2, "--seed", 3, *extra)
    _cli("eval", out / "tiny.minmax.onnx", "--dataset", out / "synth", "--json", out / "eval.json")


def _run_job(out: Path, hash_seed: int, job: str) -> None:
    env = _env()
    env["PYTHONHASHSEED"] = str(hash_seed)
    env["PYTHONPATH"] = f"{HERE}:{env['PYTHONPATH']}"
    code = f"import sys; from pathlib import Path; from test_determinism import {job}; {job}(Path(sys.argv[1]))"
    p = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.suffix == ".json" and p.name.startswith("eval"):
            metrics = {k: v for k, v in json.loads(data).items() if k not in TIMING_KEYS}
            data = json.dumps(metrics, sort_keys=True).encode()
        out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def _compare(a_dir: Path, b_dir: Path) -> dict[str, str]:
    a, b = _digests(a_dir), _digests(b_dir)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"different bytes from the same seed: {differ}"
    return a


def test_same_seed_same_bytes(tmp_path):
    """Run A here (the tiny SAM exported by tests/tiny_sam.py, seed 0, possibly in this very process), run B in a
    fresh process with another hash seed that exports the tiny SAM itself: every byte equal."""
    from tiny_sam import tiny_sam_paths

    _job(tmp_path / "a", tiny_sam_paths()["full"])
    _run_job(tmp_path / "b", 12345 if os.environ.get("PYTHONHASHSEED") != "12345" else 54321, "_job")
    files = _compare(tmp_path / "a", tmp_path / "b")
    expected = {"tiny.onnx", "eval.json", "synth/annotations.json", *(f"tiny.{m}.onnx" for m in QUANTIZE)}
    assert expected <= set(files), sorted(files)
    metrics = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert metrics["num_instances"] > 0 and 0 <= metrics["mIoU"] <= 1
    # a different seed does give different bytes (the comparison can tell)
    _cli("data", "synth", "-o", tmp_path / "c", "--num-images", 3, "--seed", 8, "--image-size", 128)
    assert (tmp_path / "c" / "annotations.json").read_bytes() != (tmp_path / "a" / "synth" / "annotations.json").read_bytes()


def _job_slow(out: Path, ref: Path | None = None) -> None:
    """The whole reference model through `carsam-onnx export` (or a copy of `ref`), from its weights and from
    random init; MSE's activation search."""
    import shutil

    from tiny_sam import tiny_sam_paths

    out.mkdir()
    if ref is None:
        _cli("export", "--model-type", "reference", "-o", out / "ref.onnx")
    else:
        shutil.copy(ref, out / "ref.onnx")
    _cli("export", "--model-type", "reference", "--random-init", "--seed", 5, "-o", out / "ref_random.onnx")
    _cli("quantize", tiny_sam_paths()["full"], "-o", out / "tiny.mse_w8a8.onnx", "--method", "mse", "--bits", "w8a8",
         "--num-calib", 2)


@pytest.mark.slow
def test_same_seed_same_bytes_reference_export_and_mse_activations(tmp_path):
    """Run A here, its trained export the suite's shared one (tests/sam_models.py: the same build_sam + export_onnx
    as `carsam-onnx export`, made in whichever worker needed it first); run B in a fresh process with another hash
    seed, every export through the CLI: every byte equal."""
    from sam_models import reference_onnx_path

    _job_slow(tmp_path / "a", reference_onnx_path("full"))
    _run_job(tmp_path / "b", 2, "_job_slow")
    assert set(_compare(tmp_path / "a", tmp_path / "b")) == {"ref.onnx", "ref_random.onnx", "tiny.mse_w8a8.onnx"}
