"""The ONNX Runtime session settings under which a carsam Q/DQ model computes what its graph says (issue 9).

Every place in the project that opens an ONNX Runtime session takes its options from `session_options()`;
emission records the same settings in each model's metadata (passes/emit/graph.py: ORT_SESSION_CONFIG under
SESSION_CONFIG_KEY, JSON), and README says what a user's own code must set. Facts (docs/quantization_format.md,
"ONNX Runtime notes"), onnxruntime 1.31:
- at its default level ORT fuses a weight DequantizeLinear (INT4, and INT8 as well) + MatMul with float activations
  into MatMulNBits at accuracy level 4 (activations quantized to int8 inside the kernel);
  `session.qdq_matmulnbits_accuracy_level = 0` keeps the float activations;
- its WeightBiasQuantization optimizer rounds a float bias of a Conv / ConvTranspose / Gemm that reads a DQ
  input to int32 at (input scale x weight scale); `optimization.disable_specified_optimizers` turns it off;
- its MatMulAddFusion (level 1) turns MatMul + bias Add into Gemm before the QDQ fusions (level 2) run, so a
  quantized Linear layer's DQ -> MatMul group is never fused into MatMulIntegerToFloat: the weights are
  dequantized at every run and the float Gemm makes a W8A8 encoder slower than FP32 (reference encoder, 1 thread:
  229 ms against 155 FP32; with the fusion off 123 ms, all 72 MatMuls integer; docs/benchmarks.md). It is in
  the same disabled list (`;`-separated);
- ORT cannot apply these from the model itself: its `ORT_LOAD_CONFIG_FROM_MODEL` / "ort_config" metadata accepts
  thread counts, execution mode, optimisation level and profiling only, no session config entries.
The 8-bit integer kernels need no option: the default integer format (QuantConfig.int8_weights) is exact on every
x86 CPU.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from ..passes.emit import ORT_SESSION_CONFIG as SESSION_CONFIG
from ..passes.emit import ORT_SESSION_CONFIG_KEY as SESSION_CONFIG_KEY

__all__ = ["SESSION_CONFIG", "SESSION_CONFIG_KEY", "session_options", "inference_session", "session_config_metadata",
           "ISA_FLAGS", "host_isa_flags"]


def session_options(threads: int | None = None, level=None, extra: dict[str, str] | None = None):
    """onnxruntime.SessionOptions with SESSION_CONFIG applied (level: a GraphOptimizationLevel, default ENABLE_ALL),
    then `extra` session config entries (measurements of other settings; docs/quantization_format.md)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in {**SESSION_CONFIG, **(extra or {})}.items():
        so.add_session_config_entry(key, value)
    if threads:
        so.intra_op_num_threads = threads
    return so


def inference_session(src, providers: Sequence[str] | None = None, threads: int | None = None, **options):
    """onnxruntime.InferenceSession(src) with session_options(); src: a path or serialized model bytes."""
    import onnxruntime as ort

    so = session_options(threads)
    for k, v in options.items():
        setattr(so, k, v)
    return ort.InferenceSession(src, so, providers=list(providers or ["CPUExecutionProvider"]))


def session_config_metadata() -> dict[str, str]:
    """{SESSION_CONFIG_KEY: JSON} for a model's metadata_props."""
    return {SESSION_CONFIG_KEY: json.dumps(SESSION_CONFIG, sort_keys=True)}


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def host_isa_flags() -> str:
    """The x86 flags that decide which integer kernels ONNX Runtime dispatches (/proc/cpuinfo), space-separated;
    for benchmark records whose figures depend on them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    found = set(re.findall(r"\b(" + "|".join(ISA_FLAGS) + r")\b", text))
    return " ".join(f for f in ISA_FLAGS if f in found) or "none of " + "/".join(ISA_FLAGS)
