"""tools/bench_recon.py: its results section (gap closed from cached cells) and the splice into results.md."""
from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_recon  # noqa: E402


def test_section_reports_mean_std_and_gap_closed(tmp_path):
    res = {("fp", 2): {"segm_mAP": 80.0}}
    for c, (b, r) in zip((1, 2, 3), ((70.0, 74.0), (72.0, 75.0), (71.0, 73.0))):
        res[(f"mse_w4a4_c{c}", 2)] = {"segm_mAP": b}
        res[(f"recon_cpu200_w4a4_c{c}", 2)] = {"segm_mAP": r, "quantize_s": 600.0}
    a = Namespace(val_seeds=[2], bits=["w4a4"], calib_seeds=[1, 2, 3], baseline="mse", num_val=200, limit=None,
                  num_calib=32, device="cpu")
    md = bench_recon.markdown(res, a, lambda bits: 200, "the reference model")   # steps per bit width
    row = next(line for line in md.splitlines() if line.startswith("| W4A4"))
    assert "steps per unit w4a4 200 (cpu schedule)" in md
    assert "71.00 ± 1.00 (n=3)" in row and "74.00 ± 1.00 (n=3)" in row and "| 33% |" in row   # (74-71)/(80-71)
    out = tmp_path / "results.md"
    out.write_text("# Results\n\nkept text\n")
    bench_recon.write_section(out, md)
    bench_recon.write_section(out, md.replace("74.00", "99.00"))     # a rerun replaces its own section only
    text = out.read_text()
    assert text.startswith("# Results\n\nkept text\n") and text.count(bench_recon.BEGIN) == 1
    assert "99.00" in text and "74.00 ±" not in text
