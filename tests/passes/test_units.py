"""Reconstruction units come from the graph's structure: the same roles and counts on every exporter's graph."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
from sam_models import CACHE, _code_hash, official_decoder_path, sam_onnx_path
from tiny_sam import TINY, _built, tiny_sam_paths

from carsam_onnx.passes.units import find_units
from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx.passes.plan import plan_quantization

DECODER_UNITS = {"decoder_self": 2, "decoder_token_to_image": 2, "decoder_mlp": 2, "decoder_image_to_token": 2,
                 "decoder_final_token_to_image": 1}


def _units(path):
    model = onnx.load(str(path))
    return find_units(model, plan_quantization(model, QuantConfig(bits=BitWidths(4, 4)))), model


def _signature(units):
    return [(u.role, u.block, len(u.inputs), len(u.weights), len(u.activations)) for u in units]


def _tiny_torchscript_full() -> Path:
    from carsam_onnx.export.onnx_export import export_onnx

    path = CACHE / f"tiny_full_torchscript_s0_{_code_hash()}.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save_model(export_onnx(_built(0), part="full", exporter="torchscript"), str(tmp))
        tmp.rename(path)
    return path


def test_tiny_full_model_units_cover_every_quantized_layer():
    units, model = _units(tiny_sam_paths()["full"])
    roles = Counter(u.role for u in units)
    depth = TINY.encoder_depth
    enc_attn = roles["encoder_window"] + roles["encoder_global"]
    assert enc_attn == depth and roles["encoder_mlp"] == depth and roles["neck"] == 1
    assert {r: roles[r] for r in DECODER_UNITS} == DECODER_UNITS
    assert "layer" not in roles
    plan = plan_quantization(model, QuantConfig(bits=BitWidths(4, 4)))
    covered = {w for u in units for w in u.weights}
    layers = {w.initializer for w in plan.weights if w.kind.value != "constant"}
    assert layers <= covered
    assert {a.value for a in plan.activations} <= {a for u in units for a in u.activations}
    # every unit's inputs are computed before its output: graph order
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    outs = [order[u.output] for u in units]
    assert outs == sorted(outs)
    # attention units end at the output projection plus bias, before the residual add
    for u in units:
        if u.kind == "attention":
            prod = next(n for n in model.graph.node if u.output in n.output)
            assert prod.op_type in ("Add", "MatMul", "Gemm")


def test_tiny_units_match_across_exporters():
    dyn, _ = _units(tiny_sam_paths()["full"])
    ts, _ = _units(_tiny_torchscript_full())
    assert _signature(dyn) == _signature(ts)


@pytest.mark.slow
def test_vit_b_decoder_units_match_across_exporters():
    sigs = {}
    for name, path in [("dynamo", sam_onnx_path("vit_b", part="decoder", exporter="dynamo")),
                       ("torchscript", sam_onnx_path("vit_b", part="decoder", exporter="torchscript")),
                       ("official", official_decoder_path("vit_b"))]:
        units, _ = _units(path)
        assert Counter(u.role for u in units) == Counter(DECODER_UNITS), name
        sigs[name] = [(u.role, u.block) for u in units]
    assert sigs["dynamo"] == sigs["torchscript"] == sigs["official"]


def test_inspect_json_lists_units(capsys):
    from carsam_onnx.cli import main

    assert main(["inspect", str(tiny_sam_paths()["decoder"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Counter(u["role"] for u in info["units"]) == Counter(DECODER_UNITS)
    assert all(u["output"] and u["inputs"] for u in info["units"])


def test_decoder_units_take_the_decoder_factor_of_steps():
    """ReconConfig.decoder_factor multiplies the steps of mask-decoder units (joint ones too, on top of their
    member count) and leaves the encoder's blocks and the neck at the base count."""
    from carsam_onnx.config import ReconConfig
    from carsam_onnx.passes.units import joint_units

    units, model = _units(tiny_sam_paths()["full"])
    decoder = [u for u in units if u.in_decoder]
    assert Counter(u.role for u in decoder) == DECODER_UNITS
    assert {u.role for u in units if not u.in_decoder} >= {"neck", "encoder_mlp"}
    rc = ReconConfig(iters=10, decoder_factor=4)
    assert {rc.unit_iters("cpu", u) for u in units if not u.in_decoder} == {10}
    assert {rc.unit_iters("cpu", u) for u in decoder} == {40}
    joint = [u for u in joint_units(model, units, "mlp") if u.members]
    assert joint and all(u.in_decoder and rc.unit_iters("cpu", u) == 40 * len(u.members) for u in joint)
    assert ReconConfig(iters=10).unit_iters("cpu", decoder[0]) == 10      # default factor 1


def test_decoder_factor_below_one_is_refused():
    from carsam_onnx.config import ReconConfig
    from carsam_onnx.errors import InputError

    with pytest.raises(InputError, match="decoder-factor"):
        ReconConfig(decoder_factor=0)
