"""Run ONNX's own backend node test cases (onnx.backend.test.case.node) through the torch executor.

The installed onnx wheel ships the generators of its node tests rather than the data directories, so the
cases are produced with `collect_testcases`; each case is a one-node model and input/expected-output
arrays. A case counts as *run* when every op in its graph is registered; it passes when all outputs
match with the case's tolerance (rtol 1e-3, atol 1e-7 by default, as onnx's backend runner).
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import numpy_helper

from carsam_onnx.torchexec.module import OnnxModule
from carsam_onnx.torchexec.ops import REGISTRY, tensor_from_proto
from carsam_onnx.errors import UnsupportedOpError

# Cases of supported ops that are deliberately not passed, with the reason (fnmatch patterns on the case name).
EXCLUDED: dict[str, str] = {
    "test_*FLOAT8*": "float8 types are not a target of this project",
    "test_*e4m3*": "float8 types are not a target of this project",
    "test_*e5m2*": "float8 types are not a target of this project",
    "test_*float4*": "float4 types are not a target of this project",
    "test_*FLOAT4*": "float4 types are not a target of this project",
    "test_*e8m0*": "float8 e8m0 is not a target of this project",
    "test_*string*": "string tensors have no torch type",
    "test_*INT2*": "2-bit integers are not a target of this project",
    "test_*int2*": "2-bit integers are not a target of this project",
    "test_*uint2*": "2-bit integers are not a target of this project",
    "test_reduce_*empty_set*": "reductions over empty tensors (torch refuses max/min over zero elements)",
    "test_resize_*tf_crop_and_resize*": "Resize: tf_crop_and_resize (not produced by SAM exports)",
    "test_resize_*antialias*": "Resize: antialias (not produced by SAM exports)",
    "test_resize_*exclude_outside*": "Resize: exclude_outside (not produced by SAM exports)",
    "test_resize_*cubic_asymmetric*":
        "Resize: cubic with asymmetric coordinates (torch's bicubic has half-pixel and align-corners only)",
    "test_resize_*scales_cubic_align_corners*":
        "Resize: cubic align_corners from scales (torch derives coordinates from the rounded size)",
    "test_batchnorm_*training*": "training mode",
    "test_training_dropout*": "training mode (random)",
    "test_maxpool_with_argmax*": "MaxPool Indices output",
    "test_averagepool_*dilations*": "AveragePool with dilations",
    "test_averagepool_*same_lower*": "AveragePool with asymmetric SAME_LOWER padding",
    "test_averagepool_*same_upper*": "AveragePool with asymmetric SAME_UPPER padding",
    "test_averagepool_2d_pads": "AveragePool pads larger than half the kernel",
    "test_averagepool_3d_*": "AveragePool 3-D with dilations/ceil corner cases",
    "test_cast_*_to_INT4*": "Cast to INT4/UINT4 wraps values (not needed: Q/DQ covers 4-bit)",
    "test_cast_*_to_UINT4*": "Cast to INT4/UINT4 wraps values (not needed: Q/DQ covers 4-bit)",
    "test_castlike_*INT4*": "CastLike to/from 4-bit types (not needed: Q/DQ covers 4-bit)",
    "test_castlike_*UINT4*": "CastLike to/from 4-bit types (not needed: Q/DQ covers 4-bit)",
    "test_*_uint16*": "torch has no arithmetic/compare kernels for uint16/uint32/uint64",
    "test_*_uint32*": "torch has no arithmetic/compare kernels for uint16/uint32/uint64",
    "test_*_uint64*": "torch has no arithmetic/compare kernels for uint16/uint32/uint64",
    "test_attention_*_bf16_expanded": "bfloat16 attention: rounding of intermediate bf16 values differs from numpy's",
    "test_attention_*_fp16_expanded": "float16 attention: rounding of intermediate fp16 values differs from numpy's",
    "test_bitwise_not_3d": "torch has no bitwise_not kernel for uint16",
    "test_averagepool_2d_pads_count_include_pad": "AveragePool pads larger than half the kernel",
}


@dataclass
class CaseResult:
    name: str
    status: str          # pass | fail | excluded | unsupported
    detail: str = ""


def excluded_reason(name: str) -> str | None:
    for pat, reason in EXCLUDED.items():
        if fnmatch.fnmatchcase(name, pat):
            return reason
    return None


def supported_ops_in(model) -> bool:
    return all(n.domain in ("", "ai.onnx") and n.op_type in REGISTRY for n in model.graph.node)


def collect():
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in node.collect_testcases(None) if c.kind == "node"]


def _np(a) -> np.ndarray:
    """A case's input or expected value (array, numpy scalar or TensorProto) as a numpy array of a type
    torch has (bfloat16 -> float32, 4-bit -> 8-bit)."""
    if isinstance(a, onnx.TensorProto):
        a = numpy_helper.to_array(a)
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return a.astype(np.float32)
    if a.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        return a.astype(np.int8 if a.dtype == ml_dtypes.int4 else np.uint8)
    return a


def _torch(a) -> torch.Tensor:
    if isinstance(a, onnx.TensorProto):
        return tensor_from_proto(a)
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(_np(a).copy())


def _as_numpy(v: torch.Tensor, like: np.ndarray) -> np.ndarray:
    a = v.detach().cpu()
    if a.dtype == torch.bfloat16:
        a = a.float()
    a = a.numpy()
    if like.dtype.kind in "iub" and a.dtype.kind == "f":  # QuantizeLinear codes come back as floats
        a = a.astype(np.int64)
    return a


def run_case(case) -> CaseResult:
    """pass, or (failing) excluded with the listed reason, or fail / unsupported with the error."""
    reason = excluded_reason(case.name)
    try:
        module = OnnxModule(case.model)
    except UnsupportedOpError as e:
        return CaseResult(case.name, "excluded" if reason else "unsupported", reason or str(e))
    try:
        for inputs, expected in case.data_sets:
            feeds = {vi: _torch(arr) for vi, arr in zip(module.input_names, inputs)}
            with torch.no_grad():
                out = module(**feeds)
            for name, exp in zip(module.output_names, expected):
                exp = _np(exp)
                got = _as_numpy(out[name], exp)
                if got.shape != exp.shape:
                    raise AssertionError(f"{name}: shape {got.shape} != {exp.shape}")
                f = exp.dtype.kind == "f"
                np.testing.assert_allclose(got.astype(np.float64) if f else got, exp.astype(np.float64) if f else exp,
                                           rtol=case.rtol, atol=case.atol, equal_nan=True)
    except Exception as e:  # a failing case is recorded with its reason, not raised
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        return CaseResult(case.name, "excluded" if reason else "fail", reason or msg)
    return CaseResult(case.name, "pass", "")
