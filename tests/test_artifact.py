"""The calibration file: quantize --save-calibration, then emit, gives the bytes quantize writes alone; a file
made for another model, or not a calibration file at all, is one line and exit code 2, with nothing written."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from carsam_onnx.artifact import CalibrationArtifact, load_artifact, save_artifact
from carsam_onnx.cli import main
from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx.errors import ArtifactError, OutputError
from carsam_onnx.qmath import activation_quant_from_range, weight_quant_from_minmax
from tiny_sam import tiny_sam_paths


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(code, err, out):
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    return code == 2 and len(lines) == 1 and "Traceback" not in err and not out.exists() and \
        not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)]


@pytest.fixture(scope="module", params=[("w8a8", "minmax"), ("w4a4", "percentile")], ids=["w8a8-minmax", "w4a4-percentile"])
def quantized(request, tmp_path_factory):
    """(bits, method, FP model, quantized model, calibration file) from one quantize --save-calibration run."""
    bits, method = request.param
    src, tmp = tiny_sam_paths()["full"], tmp_path_factory.mktemp(f"{bits}-{method}")
    q, cal = tmp / "q.onnx", tmp / "cal.npz"
    assert main(["-q", "quantize", str(src), "-o", str(q), "--bits", bits, "--method", method, "--num-calib", "2",
                 "--save-calibration", str(cal)]) == 0
    return bits, method, src, q, cal


def test_emit_from_saved_calibration_gives_the_same_bytes(quantized, tmp_path, capsys):
    bits, method, src, q, cal = quantized
    e = tmp_path / "e.onnx"
    code, stdout, err = run(capsys, "emit", str(src), "--calibration", str(cal), "-o", str(e))
    assert code == 0, err
    assert sha(e) == sha(q)
    assert "weights quantized" in stdout and "SQNR" not in stdout
    saved = load_artifact(cal)
    assert saved.config == QuantConfig(bits=BitWidths.parse(bits), method=method, num_calib=2)
    assert saved.model_sha256 == sha(src)
    assert saved.artifact.weights and saved.artifact.activations


def test_emit_refuses_a_calibration_of_another_model_and_other_files(quantized, tmp_path, capsys):
    paths, cal, out = tiny_sam_paths(), quantized[4], tmp_path / "e.onnx"
    code, _, err = run(capsys, "emit", str(paths["encoder"]), "--calibration", str(cal), "-o", str(out))
    assert refused(code, err, out) and "another model" in err, err
    for name, data in (("junk.npz", b"not a zip"), ("pickle.npz", None), ("missing.npz", "")):
        bad = tmp_path / name
        if data is None:
            np.savez(bad, header=np.array([{"format": "x"}], dtype=object))   # needs pickle: must be refused
        elif data:
            bad.write_bytes(data)
        code, _, err = run(capsys, "emit", str(paths["full"]), "--calibration", str(bad), "-o", str(out))
        assert refused(code, err, out), (name, err)


def test_round_trip_keeps_every_field(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    wq = weight_quant_from_minmax(w, 0, 4, block_size=16)
    wq_values = weight_quant_from_minmax(w, 1, 3)
    art = CalibrationArtifact(
        activations={"a": activation_quant_from_range(-1.5, 3.25, 6, False),
                     "b": activation_quant_from_range(-2.0, 2.0, 8, True)},
        weights={"w": wq, "v": type(wq_values)(wq_values.scale, 1, 3, None, np.zeros((16, 32), np.int8))},
        float_weights={"bias": rng.standard_normal(7).astype(np.float32)},
        info={"method": "mse", "bits": "w4a6"})
    cfg = QuantConfig(bits=BitWidths(4, 6), method="mse", block_size=16, keep_float=("x",), target="trt")
    path = save_artifact(tmp_path / "a.npz", art, cfg, "ab" * 32)
    back = load_artifact(path)
    assert back.config == cfg and back.model_sha256 == "ab" * 32 and back.artifact.info == art.info
    assert back.artifact.activations == art.activations
    for k, v in art.weights.items():
        b = back.artifact.weights[k]
        assert (b.axis, b.bits, b.block_size) == (v.axis, v.bits, v.block_size)
        assert np.array_equal(b.scale, v.scale) and b.scale.dtype == np.float32
        assert (b.values is None) == (v.values is None)
    assert np.array_equal(back.artifact.weights["v"].values, art.weights["v"].values)
    assert np.array_equal(back.artifact.float_weights["bias"], art.float_weights["bias"])
    with pytest.raises(OutputError, match="exists"):
        save_artifact(tmp_path / "a.npz", art, cfg, "ab" * 32)


def test_another_format_version_is_refused(tmp_path):
    header = {"format": "carsam-calibration", "version": 99}
    np.savez(tmp_path / "v99.npz", header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    with pytest.raises(ArtifactError, match="version 99"):
        load_artifact(tmp_path / "v99.npz")
