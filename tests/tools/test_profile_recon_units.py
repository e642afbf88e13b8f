"""tools/profile_recon_units.py: one line per unit role, each unit reconstructed alone, and the profiler table."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import profile_recon_units  # noqa: E402
from tiny_sam import tiny_sam_paths  # noqa: E402


def test_rates_per_role_and_a_profile_on_the_cpu(capsys):
    full = tiny_sam_paths()["full"]
    assert profile_recon_units.main([str(full), "--device", "cpu", "--steps", "2", "--num-calib", "2",
                                     "--roles", "encoder_mlp", "neck", "--profile-steps", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("encoder_mlp[", "neck "))]
    assert [r[0].split("[")[0] for r in rows] == ["encoder_mlp", "neck"]
    assert all(float(r[5]) > 0 for r in rows)             # steps per second of the steps alone
    assert "== encoder_mlp[0] (mlp): 1 eager steps" in out and "Self CPU time total" in out


def test_capture_timing_resumed_and_from_the_image(capsys):
    full = tiny_sam_paths()["full"]
    assert profile_recon_units.main([str(full), "--device", "cpu", "--num-calib", "2", "--captures"]) == 0
    out = capsys.readouterr().out
    assert "resumed at the frontier" in out and "from the image" in out
