"""tools/bench_parity.py --pair: the paired difference of two runs' draws, matched by draw index."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_parity  # noqa: E402


def write(path: Path, variant: str, maps: dict[int, float]) -> Path:
    rows = [{"variant": variant, "draw": k, "segm_mAP": m} for k, m in maps.items()]
    rows.append({"variant": variant, "segm_mAP": next(iter(maps.values())), "draws": list(maps.values())})   # summary
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pair_matches_draws_by_index(tmp_path):
    a = write(tmp_path / "a.jsonl", "ort", {0: 74.0, 1: 73.0, 2: 75.0, 3: 74.5})
    b = write(tmp_path / "b.jsonl", "torch-cuda", {2: 75.3, 0: 74.1, 1: 72.5})   # draw 3 missing, order shuffled
    r = bench_parity.paired(a, b)
    assert r["pair"] == "torch-cuda - ort" and r["draws"] == 3
    assert r["mean"] == pytest.approx((0.1 - 0.5 + 0.3) / 3, abs=1e-3)
    assert r["within_0.2"] == "1/3"
    assert r["se"] == pytest.approx(r["sd"] / 3 ** 0.5, abs=1e-3)


def test_pair_refuses_mixed_or_disjoint_draws(tmp_path):
    a = write(tmp_path / "a.jsonl", "ort", {0: 74.0, 1: 73.0})
    mixed = tmp_path / "m.jsonl"
    mixed.write_text(a.read_text() + json.dumps({"variant": "torch-cpu", "draw": 0, "segm_mAP": 1.0}) + "\n")
    with pytest.raises(ValueError, match="exactly one variant"):
        bench_parity.paired(a, mixed)
    with pytest.raises(ValueError, match="fewer than 2"):
        bench_parity.paired(a, write(tmp_path / "c.jsonl", "torch-cpu", {5: 70.0, 6: 71.0}))
