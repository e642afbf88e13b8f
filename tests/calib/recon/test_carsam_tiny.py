"""`--method carsam` end to end on the tiny SAM: MAC corrections reach the artifact, the decoder's paired units are
reconstructed jointly, the fake-quant model equals the emitted file, the same seed gives the same bytes, and with
both parts switched off it is exactly `--method recon`."""
from __future__ import annotations

from dataclasses import replace

import pytest
from recon_checks import _check_emitted_equals_torch, _samples

from carsam_onnx.calib.baseline import calibrate_baseline
from carsam_onnx.calib.feeds import build_feeds
from carsam_onnx.calib.recon import calibrate_carsam, calibrate_recon, find_units, joint_units
from carsam_onnx.calib.recon.loop import reconstruct
from carsam_onnx.config import BitWidths, CarsamConfig, QuantConfig, ReconConfig
from carsam_onnx.errors import InputError
from carsam_onnx.passes.emit import emit_qdq, target_options
from carsam_onnx.passes.plan import plan_quantization


@pytest.fixture(scope="module")
def tiny():
    from tiny_sam import tiny_sam_paths

    from carsam_onnx.modelio import load_model

    model = load_model(tiny_sam_paths()["full"])
    cfg = QuantConfig(bits=BitWidths(4, 4), method="carsam", num_calib=4, seed=1, recon=ReconConfig(iters=3))
    calib, held = _samples(cfg, 128)
    plan = plan_quantization(model, cfg)
    return model, cfg, plan, build_feeds(model, calib), build_feeds(model, held)


def _bytes(model, plan, cfg, art) -> bytes:
    return emit_qdq(model, plan, art, **target_options(cfg)).SerializeToString()


@pytest.fixture(scope="module")
def carsam_by_hand(tiny):
    """CAR-SAM spelled out: calibrator init, MAC, JCAR's joint units, reconstruction; (result, reconstructor).
    Shared by the two tests below (a tiny-SAM CAR-SAM run is the costliest part of this module)."""
    from carsam_onnx.calib.mac import apply_mac

    model, cfg, plan, feeds, _ = tiny
    base = calibrate_baseline(model, plan, replace(cfg, method=cfg.recon.init_method), feeds)
    base = apply_mac(model, plan, base, feeds, cfg.mac)
    units = joint_units(model, find_units(model, plan), cfg.carsam.pairing)
    return reconstruct(model, plan, base, cfg, feeds, units, progress=False)


def test_carsam_runs_mac_and_joint_units_and_is_deterministic(tiny, carsam_by_hand):
    """calibrate_carsam: MAC reached the artifact, the paired decoder units ran jointly; and it gives the same
    bytes as a second, separate run of the same steps (carsam_by_hand): the same seed, the same bytes."""
    model, cfg, plan, feeds, held = tiny
    stats: list = []
    art = calibrate_carsam(model, plan, cfg, feeds, stats=stats)
    names = [s.name for s in stats]
    assert names.count("decoder_joint_attn[0]") == 1 and "decoder_token_to_image[0]" not in names
    assert names.index("decoder_mlp[0]") < names.index("decoder_joint_attn[0]")   # the MLP between: on its own, first
    joint = next(s for s in stats if s.kind == "joint")
    assert joint.iters == 2 * 3 and len(joint.curve) == joint.iters          # 2 members x 3 steps
    assert art.float_weights, "MAC corrected no projection"
    assert art.info["method"] == "carsam" and art.info["carsam_jcar"] == "attn"
    again = carsam_by_hand[0].artifact
    again = replace(again, info={**again.info, "method": "carsam", "carsam_mac": "True", "carsam_jcar": "attn",
                                      "carsam_jcar_fallback": "False"})
    assert _bytes(model, plan, cfg, art) == _bytes(model, plan, cfg, again)


def test_carsam_fake_quant_model_equals_emitted_file(tiny, carsam_by_hand):
    model, cfg, plan, feeds, held = tiny
    result, r = carsam_by_hand
    _check_emitted_equals_torch(model, plan, cfg, result.artifact, r, held, min_db=None)


def test_carsam_without_mac_and_jcar_is_recon(tiny):
    """Two images of the four: the two paths must agree byte for byte whatever the data, and each run costs
    in proportion to the images."""
    model, cfg, plan, feeds, _ = tiny
    cfg = replace(cfg, num_calib=2)
    feeds = feeds[:2]
    off = replace(cfg, carsam=CarsamConfig(use_mac=False, use_jcar=False))
    assert _bytes(model, plan, cfg, calibrate_carsam(model, plan, off, feeds)) == \
        _bytes(model, plan, cfg, calibrate_recon(model, plan, replace(cfg, method="recon"), feeds))


def test_deferred_mac_sees_the_reconstructed_encoder_and_corrects_only_what_is_not_learned_yet(tiny, monkeypatch):
    """`MacConfig.when` "decoder": MAC runs once, just before the first unit holding a projection it corrects;
    the model it measures has the earlier units' rounding fixed (learned), the corrected ones' not."""
    from carsam_onnx.calib import mac as mac_pkg

    model, cfg, plan, feeds, _ = tiny
    seen = []
    real = mac_pkg.mac_sites

    def spy(*args, **kw):
        seen.append(args[2])
        return real(*args, **kw)
    monkeypatch.setattr(mac_pkg, "mac_sites", spy)
    cfg = replace(cfg, carsam=CarsamConfig(use_jcar=False), mac=replace(cfg.mac, when="decoder"))
    art = calibrate_carsam(model, plan, cfg, feeds)
    assert len(seen) == 1
    names = mac_pkg.mac_weight_names(model, plan, cfg.mac)
    units = find_units(model, plan)
    first = next(i for i, u in enumerate(units) if names & set(u.weights))
    assert first > 0 and units[first].name.startswith("decoder")
    learned = {n for n, w in seen[0].weights.items() if w.values is not None}
    assert learned and learned <= {w for u in units[:first] for w in u.weights} and not learned & names
    assert art.float_weights and set(art.float_weights) <= names
    assert "when=decoder" in art.info["mac_config"] and art.info["mac"] == "on"
    start = calibrate_carsam(model, plan, replace(cfg, mac=replace(cfg.mac, when="start")), feeds)
    assert _bytes(model, plan, cfg, art) != _bytes(model, plan, cfg, start)


def test_mac_rounding_nearest_keeps_the_corrected_projections_at_nearest_rounding(tiny):
    """`--mac-rounding nearest`: the q/k/v weights of MAC's scope carry no learned integers (emission rounds their
    float values, corrected where MAC corrected them, to nearest); the other weights still learn theirs."""
    from carsam_onnx.calib import mac as mac_pkg

    model, cfg, plan, feeds, _ = tiny
    cfg = replace(cfg, carsam=CarsamConfig(mac_rounding="nearest"))
    art = calibrate_carsam(model, plan, cfg, feeds)
    names = mac_pkg.mac_weight_names(model, plan, cfg.mac)
    corrected = [n for n in art.float_weights if n in art.weights]
    assert corrected and set(corrected) <= names
    assert all(art.weights[n].values is None for n in names if n in art.weights)
    assert any(w.values is not None for n, w in art.weights.items() if n not in names)
    with pytest.raises(InputError, match="mac-rounding"):
        CarsamConfig(mac_rounding="round")


def _rig_guard_against_joint_units(monkeypatch):
    """The unit guard scores a unit's learned values first, then the calibrator's: make every joint unit's
    learned values lose, as the CPU schedule's first joint unit did on every calibration seed."""
    from carsam_onnx.calib.recon import loop

    real, calls = loop.Reconstructor._final_loss, {}

    def rigged(self, unit, *args):
        if unit.kind == "joint":
            calls[unit.name] = calls.get(unit.name, 0) + 1
            if calls[unit.name] == 1:
                return float("inf")
        return real(self, unit, *args)
    monkeypatch.setattr(loop.Reconstructor, "_final_loss", rigged)


def test_a_rejected_joint_unit_is_followed_by_its_members_one_by_one(tiny, monkeypatch):
    """--jcar-fallback: after the guard rejects a joint unit its members run one by one and learn, while what
    was finished before it stays as it was; without the fallback the members never run."""
    model, cfg, plan, feeds, _ = tiny
    cfg, feeds = replace(cfg, num_calib=2), feeds[:2]
    _rig_guard_against_joint_units(monkeypatch)
    units = joint_units(model, find_units(model, plan), "mlp")
    joint = next(u for u in units if u.members)
    earlier = {v for u in units[:units.index(joint)] for v in u.activations}
    runs = {}
    for fallback in (True, False):
        stats: list = []
        art = calibrate_carsam(model, plan, replace(cfg, carsam=CarsamConfig(use_mac=False, joint_fallback=fallback,
                                                                        pairing="mlp")),
                               feeds, stats=stats)
        runs[fallback] = (art, stats)
    art, stats = runs[True]
    names = [s.name for s in stats]
    j = names.index(joint.name)
    assert stats[j].kept == "init"
    assert tuple(names[j + 1:j + 1 + len(joint.members)]) == joint.members
    assert all(len(s.curve) == cfg.recon.iters for s in stats[j + 1:j + 1 + len(joint.members)])
    assert art.info["carsam_jcar_fallback"] == "True"
    off_art, off_stats = runs[False]
    assert not set(joint.members) & {s.name for s in off_stats}
    # the fallback reopened only the joint unit's own quantizers: those finished before it are untouched ...
    assert earlier and all(art.activations[v] == off_art.activations[v] for v in earlier if v in art.activations)
    # ... and the members learned theirs: some step size moved away from where the rejected joint unit left it
    mine = [v for v in joint.activations if v not in earlier and v in art.activations]
    assert any(art.activations[v].scale != off_art.activations[v].scale for v in mine)
