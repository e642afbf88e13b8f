"""IEEE float32 on GPUs while a graph is evaluated.

cuDNN convolutions default to TF32 on Ampere and newer GPUs (`torch.backends.cudnn.allow_tf32` is True), which
keeps 10 mantissa bits of each operand. ONNX Runtime computes in full float32. Before a 4-bit activation
quantizer, a relative error of ~1e-3 moves values across rounding boundaries, so a TF32 run of a Q/DQ graph
scores differently from ONNX Runtime running the same file (issue 11: 0.45 mAP apart on 80 images, W4A4). The
torch runtime evaluates under `ieee_fp32()`; calibration is free to use TF32, since what ships is scored in ORT.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def ieee_fp32():
    """Turn TF32 off for cuDNN convolutions and CUDA matmuls inside the block; restore the settings after."""
    with tf32(False):
        yield


@contextmanager
def tf32(allowed: bool):
    """TF32 for cuDNN convolutions and CUDA matmuls on (True) or off (False) inside the block; the settings come
    back after."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
