"""The Triton kernels of lsq_drop (CUDA) against its torch ops: in Triton's interpreter on a CPU, and on a GPU
where one is present."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

CASES = [(0, -8, 7), (0, 0, 15), (8, 0, 15), (0, -128, 127)]

# x / s exact for s = 0.25: ties (t = k + 0.5) on both sides of zero, codes on and beyond both bounds, and a
# length that is no multiple of the kernel's block
CHECK = textwrap.dedent("""
    import numpy as np, torch
    from carsam_onnx.torchexec import lsq_drop_triton as tri
    from carsam_onnx.torchexec.fakequant import fake_quant_values, kernel_mismatch, lsq_drop_backward
    rng = np.random.default_rng(0)
    n, saturated = 2 * tri.BLOCK + 77, 0
    ties = (np.arange(-40, 40) + 0.5) * 0.25
    for zp, lo, hi in {cases}:
        for s in (0.25, 0.0371):
            x = np.concatenate([ties, rng.normal(scale=3.0, size=n - ties.size)]).astype(np.float32)
            x = torch.from_numpy(x)
            keep = torch.from_numpy(rng.random(n) < 0.5)
            grad = torch.from_numpy(rng.normal(size=n).astype(np.float32))
            scale = torch.tensor(s, dtype=torch.float32)
            want = torch.where(keep, x, fake_quant_values(x, scale, zp, lo, hi))
            got = tri.forward(x, scale, keep, zp, lo, hi)
            assert torch.equal(got, want), (zp, lo, hi, s, (got != want).sum())
            gx_ref, gs_ref = lsq_drop_backward(grad, x, scale, keep, zp, lo, hi, 0.01)
            gx, gs = tri.backward(grad, x, scale, keep, zp, lo, hi, 0.01)
            assert torch.equal(gx, gx_ref)
            saturated += int((gx == 0).sum())
            assert gs.shape == scale.shape and abs(float(gs) - float(gs_ref)) <= 1e-5 * abs(float(gs_ref)) + 1e-7
    assert saturated > 0
    print("ok", kernel_mismatch(tri, "cpu"))
""")


def test_kernels_compute_the_torch_ops_in_tritons_interpreter():
    """Forward values and the gradient of x bit for bit, the scale's gradient to 1e-5 (block sums), for signed,
    unsigned, zero-pointed and 8-bit grids: the kernels' arithmetic checked without a GPU; and the one-time check
    that lets them serve a GPU (fakequant.kernel_mismatch) passes them."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", CHECK.format(cases=CASES)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok None", r.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("zp,lo,hi", CASES)
def test_lsq_drop_on_cuda_has_the_values_and_gradients_of_its_torch_ops(zp, lo, hi):
    """On a GPU: lsq_drop (Triton) against the same call through torch ops, alone and under vmap."""
    from carsam_onnx.torchexec import fakequant

    rng = np.random.default_rng(1)
    x0 = torch.from_numpy(rng.normal(scale=0.6, size=(4, 6, 300)).astype(np.float32)).cuda()
    keep = torch.from_numpy(rng.random(size=x0.shape) < 0.5).cuda()
    w = torch.from_numpy(rng.normal(size=x0.shape).astype(np.float32)).cuda()
    for batched in (False, True):
        results = []
        for fused in (False, True):
            fakequant.FUSED_ON_CUDA = fused
            try:
                x = x0.clone().requires_grad_(True)
                s = torch.tensor(0.05, device="cuda", requires_grad=True)
                fn = fakequant.lsq_drop
                if batched:
                    fn = torch.func.vmap(fn, in_dims=(0, None, 0, None, None, None))
                out = fn(x, s, keep, zp, lo, hi)
                (out * w).sum().backward()
                results.append((out.detach(), x.grad, s.grad))
            finally:
                fakequant.FUSED_ON_CUDA = True
        (ref, gx_ref, gs_ref), (out, gx, gs) = results
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
        torch.testing.assert_close(gs, gs_ref, rtol=1e-5, atol=1e-9)


class _Broken:
    """Kernels that round half away from zero (torch.round rounds half to even)."""

    @staticmethod
    def forward(x, scale, keep, zero_point, qmin, qmax):
        t = torch.sign(x / scale) * torch.floor((x / scale).abs() + 0.5)
        q = torch.clamp(t + zero_point, qmin, qmax) - zero_point
        return torch.where(keep, x, q * scale)

    @staticmethod
    def backward(grad, x, scale, keep, zero_point, qmin, qmax, g):
        from carsam_onnx.torchexec.fakequant import lsq_drop_backward

        return lsq_drop_backward(grad, x, scale, keep, zero_point, qmin, qmax, g)


class _Failing:
    @staticmethod
    def forward(*_):
        raise RuntimeError("no compiler for this GPU\nsecond line")


def test_kernel_check_accepts_the_torch_ops_and_refuses_other_rounding_or_a_failure():
    """The check run once before the kernels serve a GPU: torch's own ops pass it; rounding half away from zero
    (ties on the tensor it checks) and a kernel that raises do not, with the reason in one line."""
    from carsam_onnx.torchexec import fakequant

    class TorchOps:
        forward = staticmethod(lambda x, s, k, z, lo, hi: torch.where(k, x, fakequant.fake_quant_values(x, s, z, lo, hi)))
        backward = staticmethod(fakequant.lsq_drop_backward)

    assert fakequant.kernel_mismatch(TorchOps, "cpu") is None
    assert fakequant.kernel_mismatch(_Broken, "cpu").startswith("forward differs from the torch ops (grid -8..7")
    assert fakequant.kernel_mismatch(_Failing, "cpu") == "RuntimeError: no compiler for this GPU"

