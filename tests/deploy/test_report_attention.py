"""The report's attention and reconstruction sections (issue 12) on the tiny SAM quantized W4A4: files exist,
are PNGs of a sensible size, and the numbers in report.md agree with an independent computation."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_ctx import tiny_report_context  # noqa: E402

from carsam_onnx.calib.mac import qk_error  # noqa: E402
from carsam_onnx.calib.mac.graph import find_projection  # noqa: E402
from carsam_onnx.deploy import report as report_mod  # noqa: E402
from carsam_onnx.deploy.report import ReportContext  # noqa: E402
from carsam_onnx.deploy.report_attention import (MAP_TOKEN, attention_dissipation_section,  # noqa: E402
                                                 attention_map_section, qk_error_section, site_label)
from carsam_onnx.deploy.report_recon import recon_curves_section  # noqa: E402
from carsam_onnx.passes.emit import emit_qdq  # noqa: E402
from carsam_onnx.passes.sites import Role  # noqa: E402
from carsam_onnx.torchexec import OnnxModule  # noqa: E402


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return tiny_report_context(tmp_path_factory.mktemp("report"), num_calib=1)


def check_png(path: Path, min_side: int = 300) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side and max(im.size) <= 4000, im.size


def table(md: str, first: str) -> list[list[str]]:
    """Body rows of the markdown table whose header starts with `| first`."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first}"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def np_stats(p: np.ndarray) -> tuple[float, float]:
    """Mean normalised entropy and mean top-k mass (k = max(1, N // 100)) of rows p [..., N], in numpy."""
    p = p.astype(np.float64).reshape(-1, p.shape[-1])
    n = p.shape[-1]
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1) / np.log(n)
    k = max(1, n // 100)
    top = np.sort(p, -1)[:, ::-1][:, :k].sum(-1)
    return float(ent.mean()), float(top.mean())


def probs_of(model, ctx, values) -> list[dict]:
    m = OnnxModule(model).eval()
    with torch.no_grad():
        return [{k: v.numpy() for k, v in m.run({k: torch.from_numpy(v) for k, v in f.items()}, outputs=[],
                                                capture=values).items()} for f in ctx.held_feeds]


def test_default_sections_include_the_attention_and_recon_sections():
    names = [f.__name__ for f in report_mod.DEFAULT_SECTIONS]
    assert names[names.index("mask_overlay_section"):] == ["mask_overlay_section", "attention_dissipation_section",
                                                            "qk_error_section", "attention_map_section",
                                                            "recon_curves_section"]


def test_dissipation_numbers_match_fp_and_the_emitted_quantized_graph(ctx):
    sec = attention_dissipation_section(ctx)
    check_png(ctx.folder / "attention_dissipation.png", 600)
    assert sec.images == ["attention_dissipation.png"] and "](attention_dissipation.png)" in sec.markdown
    rows = table(sec.markdown, "site")
    sites = list(ctx.plan.attention)
    assert len(rows) == len(sites) == 9       # tiny SAM: 2 encoder blocks, 2 two-way layers x 3, final
    values = [s.probs_value for s in sites]
    fp = probs_of(ctx.fp_model, ctx, values)
    q = probs_of(ctx.q_model, ctx, values)    # the emitted Q/DQ graph: its Softmax outputs, before their Q/DQ
    base = probs_of(emit_qdq(ctx.fp_model, ctx.plan, ctx.extra["baseline"]), ctx, values)
    for site, row in zip(sites, rows):
        assert row[0].startswith(site_label(site))
        n = fp[0][site.probs_value].shape[-1]
        assert int(row[1]) == n and int(row[2]) == max(1, n // 100)
        # columns: entropy FP, baseline, this run; top-k FP, baseline, this run
        e_fp, t_fp = np_stats(np.concatenate([f[site.probs_value].reshape(-1, n) for f in fp]))
        e_q, t_q = np_stats(np.concatenate([f[site.probs_value].reshape(-1, n) for f in q]))
        e_b, t_b = np_stats(np.concatenate([f[site.probs_value].reshape(-1, n) for f in base]))
        assert abs(float(row[4]) - e_b) < 1e-4 and abs(float(row[7]) - t_b) < 1e-4, (row, e_b, t_b)
        assert abs(float(row[3]) - e_fp) < 1e-4 and abs(float(row[6]) - t_fp) < 1e-4, (row, e_fp, t_fp)
        assert abs(float(row[5]) - e_q) < 1e-4 and abs(float(row[8]) - t_q) < 1e-4, (row, e_q, t_q)
        assert 0.0 < float(row[3]) <= 1.0 and 0.0 < float(row[6]) <= 1.0
    assert "baseline (percentile, w4a4)" in sec.markdown and "this run (minmax, w4a4)" in sec.markdown


def test_qk_error_section_before_and_after_corrected_weights(ctx):
    assert qk_error_section(ctx) is None               # no float_weights: no MAC, no section
    final = next(s for s in ctx.plan.attention if s.role == Role.DECODER_FINAL_TOKEN_TO_IMAGE)
    proj = find_projection(ctx.fp_model, final.k_proj)
    from onnx import numpy_helper

    w = numpy_helper.to_array(next(t for t in ctx.fp_model.graph.initializer if t.name == proj.weight))
    fw = {proj.weight: (w * 1.5).astype(np.float32)}   # a "correction" that spoils the final site only
    art = ctx.artifact
    old = dict(art.float_weights)
    art.float_weights.update(fw)
    try:
        sec = qk_error_section(ctx)
    finally:
        art.float_weights.clear()
        art.float_weights.update(old)
    check_png(ctx.folder / "qk_error_mac.png")
    rows = table(sec.markdown, "site")
    before = qk_error(ctx.fp_model, ctx.plan, art, ctx.held_feeds, float_weights={})
    for site, row in zip(ctx.plan.attention, rows):
        assert abs(float(row[1]) - 100 * before[site.qk_matmul]) < 0.006
        assert abs(float(row[2]) - float(row[1]) - float(row[3])) < 0.011      # change = after - before
        if site == final:                # the spoiled k projection raises this site's error ...
            assert float(row[3]) > 1.0, row
        else:                            # ... and no other (all others come before it or use other weights)
            assert float(row[3]) == 0.0, row
    assert 0 < float(rows[-1][1]) < float(rows[-1][2])
    assert "1 of 9 sites changed; 1 corrected tensors" in sec.markdown


def test_qk_error_section_after_reconstruction_shows_macs_own_record(ctx, tmp_path):
    """--method carsam: the corrected projections were re-rounded by reconstruction, so the section shows what
    MAC measured on its check images (artifact info), site by site, instead of a before/after it cannot form."""
    from dataclasses import replace
    from types import SimpleNamespace

    sites = [s for s in ctx.plan.attention if s.role.value.startswith("decoder")]
    text = "; ".join(f"{s.role.value}:{s.block} {0.3 + i / 100:.4f}->{0.2 + i / 100:.4f} k=1 v={0.5 if i else 0:g}"
                     for i, s in enumerate(sites))
    learned = SimpleNamespace(values=np.zeros(3, dtype=np.int8))   # AdaRound's integers: reconstructed
    art = SimpleNamespace(float_weights={"w": np.zeros(3)}, weights={"w": learned},
                          info={"mac_check_qk_error": text, "mac_images": "24 fit, 8 check", "mac_steps": "14 kept"})
    sec = qk_error_section(replace(ctx, folder=tmp_path, artifact=art))
    check_png(tmp_path / "qk_error_mac.png")
    rows = table(sec.markdown, "site")
    assert [r[0] for r in rows] == [f"{site_label(s)} (`{s.qk_matmul}`)" for s in sites]
    assert [(float(r[1]), float(r[2]), float(r[3])) for r in rows] == [
        pytest.approx((30.0 + i, 20.0 + i, -10.0)) for i in range(len(sites))]
    assert rows[0][4] == "k=1 v=0" and rows[1][4] == "k=1 v=0.5"
    assert "8 check" in sec.markdown and f"{len(sites)} of {len(sites)} sites changed" in sec.markdown
    art.info = {}
    assert qk_error_section(replace(ctx, folder=tmp_path, artifact=art)) is None   # no record: no section


def test_attention_map_of_the_final_token_to_image_site(ctx):
    sec = attention_map_section(ctx)
    check_png(ctx.folder / "attention_maps.png", 300)
    final = next(s for s in ctx.plan.attention if s.role == Role.DECODER_FINAL_TOKEN_TO_IMAGE)
    p = probs_of(ctx.fp_model, ctx, [final.probs_value])[0][final.probs_value]
    n = p.shape[-1]
    g = math.isqrt(n)
    assert g * g == n == 64 and "8x8 image embedding grid" in sec.markdown
    row_map = p[0, :, MAP_TOKEN, :].mean(0)
    e, t = np_stats(row_map)
    rows = {r[0]: r for r in table(sec.markdown, "model")}
    assert list(rows) == ["FP", "baseline (percentile, w4a4)", "this run (minmax, w4a4)"]
    fp = rows["FP"]
    assert abs(float(fp[1]) - e) < 1e-4 and abs(float(fp[2]) - t) < 1e-4 and abs(float(fp[3]) - row_map.max()) < 1e-4
    peak = int(np.argmax(row_map))
    assert fp[4] == f"({peak % g}, {peak // g})"


@dataclass
class Unit:
    name: str
    kind: str
    iters: int
    loss_start: float
    loss_end: float
    curve: tuple | None = None


def test_recon_curves_from_records(tmp_path):
    def ctx_with(extra):
        return ReportContext(tmp_path, tmp_path / "fp.onnx", tmp_path / "q.onnx", None, None, None, None, [], [],
                             [], progress=False, extra=extra)

    assert recon_curves_section(ctx_with({})) is None
    steps = np.arange(200)
    smooth = tuple(float(x) for x in 1.0 * np.exp(-steps / 50) + 0.01)
    wobbly = tuple(float(x) for x in 1.0 * np.exp(-steps / 80) * (1.2 + np.sin(steps / 7)) + 0.02)
    units = [Unit("dec.layer0", "two_way", 200, wobbly[0], wobbly[-1], wobbly),
             Unit("dec.final", "attention", 200, smooth[0], smooth[-1], smooth[::4]),   # subsampled curve
             Unit("enc.block0", "block", 100, 0.5, 0.1)]                                  # no curve
    joint = [Unit("dec.layer0", "jcar", 200, smooth[0], smooth[-1], smooth)]
    sec = recon_curves_section(ctx_with({"recon_units": units, "recon_compare": joint,
                                         "recon_labels": ("unit by unit", "JCAR")}))
    check_png(tmp_path / "recon_loss_curves.png", 200)
    rows = table(sec.markdown, "unit")
    assert [(r[0], r[1]) for r in rows] == [("`dec.layer0`", "unit by unit"), ("`dec.layer0`", "JCAR"),
                                            ("`dec.final`", "unit by unit"), ("`enc.block0`", "unit by unit")]
    assert float(rows[0][4]) == pytest.approx(wobbly[0], rel=1e-3)
    assert float(rows[0][5]) == pytest.approx(wobbly[-1], rel=1e-3)
    assert float(rows[1][6]) == pytest.approx(smooth[-1] / smooth[0], abs=1e-3)
    assert [r[7] for r in rows] == ["yes", "yes", "yes", "no"]
    assert "unit by unit (blue) and JCAR (red)" in sec.markdown
    from carsam_onnx.calib.recon.loop import UnitStats    # the records quantize passes today (no curve yet)

    real = UnitStats("enc.block0", "block", 100, 1.5, 0.5, 0.1, "cpu")
    none = recon_curves_section(ctx_with({"recon_units": [real]}))
    assert none.images == [] and "No unit recorded a loss curve" in none.markdown
    assert table(none.markdown, "unit") == [["`enc.block0`", "this run", "block", "100", "0.5", "0.1", "0.200", "no"]]


def test_joint_unit_against_its_members_run_one_by_one(tmp_path):
    """`quantize --report B --report-compare A`: A's units come back from A's recon_units.json unchanged, and a
    joint unit of B shares its panel with A's members of it (not a panel each); units in neither relation keep
    their own. A file that is not a unit list is a one-line InputError."""
    from carsam_onnx.calib.recon.loop import UnitStats
    from carsam_onnx.deploy.report_recon import UNITS_FILE, load_units
    from carsam_onnx.errors import InputError

    def ctx_with(folder, extra):
        folder.mkdir()
        return ReportContext(folder, folder / "fp.onnx", folder / "q.onnx", None, None, None, None, [], [], [],
                             progress=False, extra=extra)

    def curve(n, rate):
        return tuple(float(x) for x in np.exp(-np.arange(n) / rate) + 0.05)

    one_by_one = [UnitStats("enc.mlp[0]", "mlp", 50, 1.0, 1.0, 0.1, "cpu", curve(50, 10)),
                  UnitStats("dec.t2i[0]", "attention", 50, 1.0, 1.0, 0.1, "cpu", curve(50, 20)),
                  UnitStats("dec.i2t[0]", "attention", 50, 1.0, 1.0, 0.1, "cpu", curve(50, 30))]
    a = tmp_path / "a"
    recon_curves_section(ctx_with(a, {"recon_units": one_by_one, "recon_labels": ("recon",)}))
    label, back = load_units(a)
    assert label == "recon" and [u.name for u in back] == [u.name for u in one_by_one]
    assert back[2].curve == pytest.approx(one_by_one[2].curve) and back[1].iters == 50
    assert load_units(a / UNITS_FILE)[1][0].loss_end == pytest.approx(0.1)

    joint = [UnitStats("enc.mlp[0]", "mlp", 50, 1.0, 1.0, 0.08, "cpu", curve(50, 9)),
             UnitStats("dec.joint[0]", "joint", 100, 1.0, 2.0, 0.15, "cpu", curve(100, 25),
                       members=("dec.t2i[0]", "dec.i2t[0]"))]
    b = tmp_path / "b"
    sec = recon_curves_section(ctx_with(b, {"recon_units": joint, "recon_compare": back,
                                            "recon_labels": ("carsam", label)}))
    check_png(b / "recon_loss_curves.png", 200)
    assert "its members reconstructed one by one (dec.joint[0])" in sec.markdown
    assert [(r[0], r[1]) for r in table(sec.markdown, "unit")] == [
        ("`enc.mlp[0]`", "carsam"), ("`enc.mlp[0]`", "recon"), ("`dec.joint[0]`", "carsam"),
        ("`dec.t2i[0]`", "recon"), ("`dec.i2t[0]`", "recon")]
    assert load_units(b)[1][1].members == ("dec.t2i[0]", "dec.i2t[0]")
    import matplotlib.pyplot as plt

    panels = []       # the panels the section lays out
    real_subplots = plt.subplots

    def spy(nrows, ncols, **kw):
        panels.append(nrows * ncols)
        return real_subplots(nrows, ncols, **kw)

    plt.subplots = spy
    try:
        recon_curves_section(ctx_with(tmp_path / "c", {"recon_units": joint, "recon_compare": back}))
    finally:
        plt.subplots = real_subplots
    assert panels == [2], "enc.mlp[0] and dec.joint[0] (with its two members): two panels"
    (tmp_path / "bad.json").write_text('{"units": [{"kind": "mlp"}]}')
    for bad in (tmp_path / "bad.json", tmp_path / "nothing"):
        with pytest.raises(InputError, match="--report-compare"):
            load_units(bad)
