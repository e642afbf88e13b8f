"""tools/unit_sensitivity.py: a group put in float loses exactly its own Q/DQ nodes and gets its FP weights back;
the group `none` emits the shipped model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import unit_sensitivity  # noqa: E402
from tiny_sam import tiny_sam_paths  # noqa: E402

from carsam_onnx.artifact import load_artifact  # noqa: E402
from carsam_onnx.cli import main  # noqa: E402
from carsam_onnx.passes.plan import plan_quantization  # noqa: E402
from carsam_onnx.passes.units import find_units  # noqa: E402
from carsam_onnx.quantize import emit_model  # noqa: E402


def _quantized(tmp_path):
    src, q, cal = tiny_sam_paths()["full"], tmp_path / "q.onnx", tmp_path / "cal.npz"
    assert main(["-q", "quantize", str(src), "-o", str(q), "--bits", "w4a4", "--method", "minmax", "--num-calib", "2",
                 "--save-calibration", str(cal)]) == 0
    model = onnx.load(str(src))
    saved = load_artifact(cal)
    return model, onnx.load(str(q)), saved, plan_quantization(model, saved.config)


def test_groups_put_their_units_in_float_and_nothing_else(tmp_path):
    model, shipped, saved, plan = _quantized(tmp_path)
    units = find_units(model, plan)
    groups = unit_sensitivity.unit_groups(units, encoder_blocks=True)
    assert groups["none"] == [] and groups["decoder"] and groups["encoder"] and groups["neck"]
    assert sum(len(groups[g]) for g in ("encoder", "neck", "decoder")) == len(units)
    assert all(len(groups[u.name]) == 1 for u in units if u.in_decoder)
    assert {g for g in groups if g.startswith("encoder block")} == {f"encoder block {b}" for b in (0, 1)}

    p, art = unit_sensitivity.float_group(plan, saved.artifact, groups["none"])
    assert emit_model(model, p, art, saved.config)[0].SerializeToString() == shipped.SerializeToString()

    dec = groups["decoder"]
    p, art = unit_sensitivity.float_group(plan, saved.artifact, dec)
    out, _ = emit_model(model, p, art, saved.config)
    dec_values = {v for u in dec for v in u.activations}
    kept_q = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    shipped_q = {n.input[0] for n in shipped.graph.node if n.op_type == "QuantizeLinear"}
    assert dec_values and not kept_q & dec_values                # every decoder activation site is float ...
    assert kept_q == shipped_q - dec_values                      # ... and no other one
    inits = {t.name: t for t in out.graph.initializer}
    fp = {t.name: t for t in model.graph.initializer}
    for w in (w for u in dec for w in u.weights):                # FP weights, as the FP model holds them
        np.testing.assert_array_equal(numpy_helper.to_array(inits[w]), numpy_helper.to_array(fp[w]))
    enc_w = [w for u in groups["encoder"] for w in u.weights]
    assert enc_w and not set(enc_w) & set(inits)                 # the encoder's weights stay quantized


def test_site_groups_put_one_site_in_float(tmp_path):
    model, shipped, saved, plan = _quantized(tmp_path)
    neck = next(u for u in find_units(model, plan) if u.role == "neck")
    groups = unit_sensitivity.site_groups(neck)
    assert len(groups) == len(neck.weights) + len(neck.activations)
    shipped_q = {n.input[0] for n in shipped.graph.node if n.op_type == "QuantizeLinear"}
    shipped_w = {t.name for t in shipped.graph.initializer}
    for name, units in groups.items():
        p, art = unit_sensitivity.float_group(plan, saved.artifact, units)
        out, _ = emit_model(model, p, art, saved.config)
        q = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
        inits = {t.name for t in out.graph.initializer}
        if " act " in name:
            v = name.split(" act ")[1]
            assert shipped_q - q == {v} and inits == {n for n in shipped_w if not n.startswith(v + "_")}
        else:
            w = name.split(" weight ")[1]
            assert q == shipped_q and w in inits and w not in shipped_w


def test_migrated_weights_keep_their_float_value(tmp_path):
    """A weight --smooth migrated goes float at its migrated value (its norm keeps the migrated parameters, so the
    pair computes the FP function); any other corrected weight (MAC's) goes back to the FP model's."""
    from dataclasses import replace

    model, _, saved, plan = _quantized(tmp_path)
    dec = unit_sensitivity.unit_groups(find_units(model, plan), encoder_blocks=False)["decoder"]
    a, b = dec[0].weights[:2]
    fp = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    art = replace(saved.artifact, float_weights={a: fp[a] * 2, b: fp[b] * 2})
    _, kept = unit_sensitivity.float_group(plan, art, dec, migrated=frozenset({a}))
    assert set(kept.float_weights) == {a}
