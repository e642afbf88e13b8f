"""The image/prompt cut for reconstruction (passes/image_cut.py): found by structure on a full model, refused
where it cannot hold."""
from __future__ import annotations

import onnx
from tiny_sam import tiny_sam_paths

from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx.passes.image_cut import image_cut_plan
from carsam_onnx.passes.plan import plan_quantization
from carsam_onnx.passes.units import find_units


def _model_units(part: str):
    model = onnx.load(str(tiny_sam_paths()[part]))
    return model, find_units(model, plan_quantization(model, QuantConfig(bits=BitWidths(4, 4))))


def test_full_model_cuts_where_the_encoder_meets_the_decoder():
    model, units = _model_units("full")
    cut, prompt_side = image_cut_plan(model, units)
    assert prompt_side == {u.name for u in units if u.role.startswith("decoder")}
    consts = {t.name for t in model.graph.initializer}
    assert cut and not set(cut) & consts and "image" not in cut
    prompt_made = {"point_coords", "point_labels"}
    for n in model.graph.node:           # graph order: everything computed from a prompt input
        if prompt_made & set(n.input):
            prompt_made.update(n.output)
    assert not set(cut) & prompt_made    # the cut is made from the image alone ...
    assert any(v in n.input for v in cut for n in model.graph.node if prompt_made & set(n.input))   # ... and read
                                         # by the prompt side


def test_no_cut_without_an_image_input_or_without_prompt_inputs():
    for part in ("decoder", "encoder"):
        model, units = _model_units(part)
        assert image_cut_plan(model, units) is None, part


def test_no_cut_when_no_unit_is_on_the_prompt_side():
    model, units = _model_units("full")
    assert image_cut_plan(model, [u for u in units if not u.role.startswith("decoder")]) is None


def test_no_cut_when_an_image_only_unit_follows_a_prompt_side_one():
    model, units = _model_units("full")
    first_decoder = next(i for i, u in enumerate(units) if u.role.startswith("decoder"))
    reordered = units[:first_decoder - 1] + units[first_decoder:] + [units[first_decoder - 1]]
    assert image_cut_plan(model, reordered) is None
