"""ONNX's backend node test cases through the torch executor: every case of every supported op runs;
a failure is allowed only where node_cases.EXCLUDED lists it with a reason. (~30 s)"""
from __future__ import annotations

import collections
import fnmatch
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_cases  # noqa: E402

# The ops the issue names (SAM exports from both exporters, the official decoder, Q/DQ graphs).
REQUIRED_OPS = """Add Sub Mul Div Pow Sqrt Erf Relu Gelu MatMul Gemm Einsum Conv ConvTranspose LayerNormalization
Softmax ReduceMean ReduceMax Reshape Transpose Squeeze Unsqueeze Concat Split Slice Gather Expand Tile Pad
Resize Shape Cast Constant ConstantOfShape Range Equal Where Not Mod Floor Reciprocal Sin Cos OneHot Identity
QuantizeLinear DequantizeLinear ArgMax Flatten""".split()


@pytest.fixture(scope="module")
def results():
    cases = node_cases.collect()
    assert len(cases) > 1000, "onnx's node test generators produced too few cases"
    return cases, [node_cases.run_case(c) for c in cases if node_cases.supported_ops_in(c.model)]


def test_every_supported_case_passes_or_is_a_listed_exclusion(results):
    cases, res = results
    counts = collections.Counter(r.status for r in res)
    print(f"\nONNX node cases: {len(cases)} in onnx, {len(res)} use only supported ops: "
          f"{counts['pass']} pass, {counts['excluded']} excluded (listed), {counts['fail']} fail, "
          f"{counts['unsupported']} unsupported")
    bad = [f"{r.name}: {r.detail}" for r in res if r.status in ("fail", "unsupported")]
    assert not bad, f"{len(bad)} unlisted failures:\n" + "\n".join(bad[:40])
    assert counts["pass"] >= 1000


def test_exclusions_are_not_stale(results):
    _, res = results
    failing = [r.name for r in res if r.status == "excluded"]
    stale = [p for p in node_cases.EXCLUDED if not any(fnmatch.fnmatchcase(n, p) for n in failing)]
    assert not stale, f"exclusion patterns that match no failing case (remove them): {stale}"
    assert all(reason for reason in node_cases.EXCLUDED.values())


def test_required_ops_are_exercised(results):
    cases, res = results
    by_name = {c.name: c for c in cases}
    passed_ops = {n.op_type for r in res if r.status == "pass" for n in by_name[r.name].model.graph.node}
    missing = [op for op in REQUIRED_OPS if op not in passed_ops]
    assert not missing, f"required ops with no passing ONNX node case: {missing}"
