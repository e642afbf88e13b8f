"""How hard is the reference model to quantize? A torch fake-quant probe (no ONNX, no CAR-SAM).

Quantized, as in the scoping probe of /work/shared/FACTS.md: the Linear layers of the encoder blocks and
of the decoder's TwoWayTransformer (weights per output channel, symmetric; inputs per tensor, asymmetric)
and both inputs of both attention MatMuls (q.k^T and softmax.v) of every attention; patch embedding,
neck, mask upscaling, hypernetwork MLPs, IoU head and prompt encoder stay in float. Activation ranges
come from 32 calibration images (synthetic seed 1) with a MinMax or a percentile calibrator; the
metric is over validation images (synthetic seed 2) prompted with ground-truth boxes.

    python tools/probe_quant_reference.py --weights carsam_onnx/assets/reference_sam.pt [--device cuda]

Prints one JSON line per setting: FP, W8A8 MinMax, W6A6 MinMax, W4A4 MinMax, W4A4 percentile 99.9,
W4A4 percentile 99.9 encoder-only / decoder-only, and the share of FP that each keeps.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from segment_anything.modeling import image_encoder as sam_enc  # noqa: E402
from segment_anything.modeling import transformer as sam_tr  # noqa: E402

from carsam_onnx.export.models import ARCHS, build_sam_arch  # noqa: E402
from train_reference import CALIB_SEED, VAL_SEED, box_xyxy, evaluate, normalise, decode_batched, validation_set  # noqa: E402

SAMPLE_PER_BATCH = 200_000


class ActQuant(nn.Module):
    """Per-tensor asymmetric fake quantizer with a MinMax or percentile calibrator."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.mode = "off"          # off | observe | quant
        self.bits = 8
        self.percentile: float | None = None
        self.lo = self.hi = None
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(name.encode()))

    def reset(self):
        self.lo = self.hi = None
        self.samples = []

    def finish(self):
        if self.percentile is not None and self.samples:
            s = torch.cat(self.samples)
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=s.device)
            self.lo, self.hi = (float(v) for v in torch.quantile(s, q))
            self.samples = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            xf = x.detach().float().flatten()
            lo, hi = float(xf.min()), float(xf.max())
            self.lo = lo if self.lo is None else min(self.lo, lo)
            self.hi = hi if self.hi is None else max(self.hi, hi)
            if self.percentile is not None:
                idx = torch.randint(0, xf.numel(), (min(SAMPLE_PER_BATCH, xf.numel()),), generator=self.gen).to(xf.device)
                self.samples.append(xf[idx])
            return x
        if self.mode == "quant":
            lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
            qmax = 2 ** self.bits - 1
            scale = max(hi - lo, 1e-8) / qmax
            zp = round(-lo / scale)
            q = torch.clamp(torch.round(x.float() / scale) + zp, 0, qmax)
            return ((q - zp) * scale).to(x.dtype)
        return x


def quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp(min=1e-8) / qmax
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale


class QLinear(nn.Module):
    def __init__(self, lin: nn.Linear, name: str):
        super().__init__()
        self.lin, self.name = lin, name
        self.inq = ActQuant(name + ".input")
        self.w_fp = lin.weight.detach().clone()
        self.wbits = None

    def set_wbits(self, bits):
        self.wbits = bits
        with torch.no_grad():
            self.lin.weight.copy_(self.w_fp if bits is None else quant_weight(self.w_fp, bits))

    def forward(self, x):
        return self.lin(self.inq(x))


def _enc_attn_forward(self, x):
    """segment-anything's image_encoder.Attention.forward with quantizers on both MatMuls' inputs."""
    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
    attn = self.q_q(q * self.scale) @ self.q_k(k).transpose(-2, -1)
    if self.use_rel_pos:
        attn = sam_enc.add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
    attn = attn.softmax(dim=-1)
    x = (self.q_p(attn) @ self.q_v(v)).view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(x)


def _dec_attn_forward(self, q, k, v):
    """segment-anything's transformer.Attention.forward with quantizers on both MatMuls' inputs."""
    q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
    q, k, v = (self._separate_heads(t, self.num_heads) for t in (q, k, v))
    c = q.shape[-1]
    attn = self.q_q(q) @ self.q_k(k).permute(0, 1, 3, 2)
    attn = torch.softmax(attn / math.sqrt(c), dim=-1)
    out = self.q_p(attn) @ self.q_v(v)
    return self.out_proj(self._recombine_heads(out))


def instrument(sam) -> tuple[dict[str, QLinear], dict[str, ActQuant]]:
    """Wrap the quantized Linears and patch attention forwards; returns (linears, matmul-input quantizers)."""
    linears, acts = {}, {}
    scopes = [("image_encoder.blocks", sam.image_encoder.blocks), ("mask_decoder.transformer", sam.mask_decoder.transformer)]
    for prefix, root in scopes:
        for name, mod in list(root.named_modules()):
            for cname, child in list(mod.named_children()):
                full = f"{prefix}.{name}.{cname}" if name else f"{prefix}.{cname}"
                if isinstance(child, nn.Linear):
                    ql = QLinear(child, full)
                    setattr(mod, cname, ql)
                    linears[full] = ql
            if isinstance(mod, (sam_enc.Attention, sam_tr.Attention)):
                base = f"{prefix}.{name}"
                for t in ("q_q", "q_k", "q_p", "q_v"):
                    aq = ActQuant(f"{base}.{t}")
                    setattr(mod, t, aq)
                    acts[aq.name] = aq
                fwd = _enc_attn_forward if isinstance(mod, sam_enc.Attention) else _dec_attn_forward
                mod.forward = types.MethodType(fwd, mod)
    for ql in linears.values():
        acts[ql.inq.name] = ql.inq
    return linears, acts


@torch.no_grad()
def calibrate(sam, calib, device, acts, percentile):
    for a in acts.values():
        a.reset()
        a.percentile = percentile
        a.mode = "observe"
    for d in calib:
        if not d[1]:
            continue
        img = torch.from_numpy(d[0][None]).to(device)
        emb = sam.image_encoder(normalise(img))
        coords = torch.from_numpy(np.stack([box_xyxy(m) for m in d[1]])).to(device).view(-1, 2, 2)
        labels = torch.tensor([2.0, 3.0], device=device).expand(len(d[1]), 2)
        decode_batched(sam, emb, len(d[1]), coords, labels)
    for a in acts.values():
        a.finish()


def configure(linears, acts, wbits, abits, scope: str = "all"):
    def on(name):
        return scope == "all" or name.startswith(scope)
    for n, ql in linears.items():
        ql.set_wbits(wbits if wbits and on(n) else None)
    for n, a in acts.items():
        a.bits = abits or 8
        a.mode = "quant" if abits and on(n) else "off"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    arch = ARCHS["reference"]
    sam = build_sam_arch(arch)
    sam.load_state_dict({k: v.float() for k, v in torch.load(args.weights, map_location="cpu", weights_only=True).items()})
    sam = sam.to(device).eval()
    linears, acts = instrument(sam)
    calib = validation_set(CALIB_SEED, args.calib_images, arch.image_size)
    val = validation_set(VAL_SEED, args.val_images, arch.image_size)

    def run(label, wbits, abits, percentile=None, scope="all"):
        configure(linears, acts, None, None)
        if abits:
            calibrate(sam, calib, device, acts, percentile)
        configure(linears, acts, wbits, abits, scope)
        m = evaluate(sam, val, device, "box", amp=False)
        return {"setting": label, **m}

    rows = [run("FP", None, None)]
    for label, w, a, p, scope in [("W8A8 MinMax", 8, 8, None, "all"), ("W6A6 MinMax", 6, 6, None, "all"),
                                  ("W4A4 MinMax", 4, 4, None, "all"), ("W4A4 p99.9", 4, 4, 99.9, "all"),
                                  ("W4A4 p99.9 encoder only", 4, 4, 99.9, "image_encoder"),
                                  ("W4A4 p99.9 decoder only", 4, 4, 99.9, "mask_decoder"),
                                  ("W4A8 MinMax", 4, 8, None, "all"), ("W3A3 p99.9", 3, 3, 99.9, "all")]:
        rows.append(run(label, w, a, p, scope))
    fp = rows[0]["ap_like"]
    for r in rows:
        r["share_of_fp"] = round(r["ap_like"] / fp, 3) if fp else None
        print(json.dumps(r), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"calib_seed": CALIB_SEED, "calib_images": args.calib_images,
                                             "val_seed": VAL_SEED, "val_images": args.val_images, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
