"""tools/bench_accuracy.py writes its table into a marked section of docs/results.md and leaves the rest alone."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from carsam_onnx.errors import OutputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    return importlib.import_module("bench_accuracy")


def test_new_file_is_the_section(bench):
    out = bench.splice_section(None, "## Table\n| a |\n")
    assert out.startswith(bench.SECTION_BEGIN) and out.rstrip().endswith(bench.SECTION_END)
    assert "| a |" in out


def test_section_appended_to_a_document_without_markers(bench):
    doc = "# Results\n\nhand-written text\n"
    out = bench.splice_section(doc, "## Table v1\n")
    assert out.startswith(doc.rstrip("\n")) and "## Table v1" in out


def test_rerun_replaces_only_the_section(bench):
    doc = bench.splice_section("# Results\n\nbefore\n", "## Table v1\n") + "\nafter\n"
    out = bench.splice_section(doc, "## Table v2\n")
    assert "## Table v2" in out and "## Table v1" not in out
    assert out.startswith("# Results\n\nbefore\n") and out.endswith("\nafter\n")
    assert out.count(bench.SECTION_BEGIN) == 1 and out.count(bench.SECTION_END) == 1


@pytest.mark.parametrize("broken", ["only-begin", "only-end", "reversed", "twice"])
def test_broken_markers_are_refused(bench, broken):
    b, e = bench.SECTION_BEGIN, bench.SECTION_END
    doc = {"only-begin": f"x\n{b}\ny\n", "only-end": f"x\n{e}\n", "reversed": f"{e}\nx\n{b}\n",
           "twice": f"{b}\n{e}\n{b}\n{e}\n"}[broken]
    with pytest.raises(OutputError, match="markers"):
        bench.splice_section(doc, "## Table\n")
