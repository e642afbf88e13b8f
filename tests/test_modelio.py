"""modelio.check_writable's input guard: an output that names an input file, by any path to it, is refused
(even with --force) before any work; other outputs pass."""
from __future__ import annotations

import os

import pytest

from carsam_onnx.errors import OutputError
from carsam_onnx.modelio import check_writable


def test_output_naming_an_input_is_refused(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    (tmp_path / "link.onnx").symlink_to(model)
    os.link(model, tmp_path / "hard.onnx")
    (tmp_path / "sub").mkdir()
    for out in (model, tmp_path / "sub" / ".." / "m.onnx", tmp_path / "link.onnx", tmp_path / "hard.onnx"):
        with pytest.raises(OutputError, match="also an input"):
            check_writable(out, force=True, inputs=[model])
    assert model.read_bytes() == b"model"


def test_other_outputs_pass(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    other = tmp_path / "q.onnx"
    assert check_writable(other, force=False, inputs=[model, None]) == other      # not there yet
    other.write_bytes(b"old")
    assert check_writable(other, force=True, inputs=[model]) == other             # another existing file
    assert check_writable(other, force=True, inputs=[tmp_path / "missing.onnx"]) == other
