"""Train the project's reference SAM-architecture model on synthetic COCO-like data.

The model is carsam_onnx.export.models.ARCHS["reference"], built from segment-anything's own classes
(ImageEncoderViT with vit_b's depth and global-attention layout, PromptEncoder, SAM's exact MaskDecoder).
Training data are drawn on the fly by carsam_onnx.data.synth.generate_sample in DataLoader workers
(sample i of the run comes from seed (--seed, i), so the data do not depend on the worker count).
Prompts: per step either jittered boxes (two corner points labelled 2/3) or 1-3 points (first positive,
then positive or negative) plus SAM's padding point, exactly as the ONNX export's inputs carry them.
Loss: BCE x20 + Dice on the single-mask output, the same on the best of the three multimask outputs, and
MSE of the IoU head to each output's true IoU. AdamW, one-cycle, bf16 autocast on CUDA.

Determinism: all randomness is seeded from --seed; GPU kernels (cuBLAS/cuDNN reductions, atomics in
backward) can still change the last bits from run to run.

    python tools/train_reference.py --out OUT [--steps 8000 --batch-images 64 --device cuda] [--time-limit S [--resume CKPT]]
    python tools/train_reference.py --out OUT2 --init-weights OUT/reference_sam.pt --seed 1 --lr 2e-4 ...   # a second stage

writes OUT/reference_sam.pt (fp16 state dict of Sam) and OUT/reference_training.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from carsam_onnx.data.synth import generate_sample, sample_rng  # noqa: E402
from carsam_onnx.export.models import ARCHS, build_sam_arch, load_checkpoint_into  # noqa: E402

PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
PROMPTS_PER_IMAGE = 4
MAX_POINTS = 3
TRAIN_SEED_BASE = 1000   # training images: seeds >= 1000; calibration 1, validation 2 (see docs)
VAL_SEED = 2
CALIB_SEED = 1


# ------------------------------------------------------------------------------------------ prompts
def box_xyxy(mask: np.ndarray) -> np.ndarray:
    """Box [x0, y0, x1, y1] in SamPredictor's frame: COCO's tight [x, y, x+w, y+h]."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def jitter_box(rng: np.random.Generator, box: np.ndarray, size: int, frac: float = 0.05) -> np.ndarray:
    w, h = box[2] - box[0], box[3] - box[1]
    noise = rng.normal(0, frac, size=4) * np.array([w, h, w, h])
    b = box + noise.astype(np.float32)
    b = np.clip(b, 0, size)
    x0, x1 = min(b[0], b[2] - 1), max(b[2], b[0] + 1)
    y0, y1 = min(b[1], b[3] - 1), max(b[3], b[1] + 1)
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def sample_points(rng: np.random.Generator, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n points (x, y) with labels: the first positive inside the mask, the rest positive or negative
    (negatives inside the box grown by 20% but off the mask, as a user would click)."""
    ys, xs = np.nonzero(mask)
    box = box_xyxy(mask)
    pts, labels = [], []
    for j in range(n):
        if j == 0 or rng.random() < 0.5:
            k = int(rng.integers(len(xs)))
            pts.append((xs[k], ys[k]))
            labels.append(1)
        else:
            w, h = box[2] - box[0], box[3] - box[1]
            x0, y0 = max(0, int(box[0] - 0.2 * w)), max(0, int(box[1] - 0.2 * h))
            x1, y1 = min(mask.shape[1], int(box[2] + 0.2 * w) + 1), min(mask.shape[0], int(box[3] + 0.2 * h) + 1)
            oy, ox = np.nonzero(~mask[y0:y1, x0:x1])
            if len(ox) == 0:
                oy, ox = np.nonzero(~mask)
                x0 = y0 = 0
            k = int(rng.integers(len(ox)))
            pts.append((ox[k] + x0, oy[k] + y0))
            labels.append(0)
    return np.array(pts, dtype=np.float32), np.array(labels, dtype=np.float32)


class SynthTrainSet(torch.utils.data.Dataset):
    """Item i: image i of synthetic seed TRAIN_SEED_BASE + seed, and PROMPTS_PER_IMAGE instances of it with
    a jittered box and MAX_POINTS sampled points each."""

    def __init__(self, seed: int, length: int, image_size: int):
        self.seed, self.length, self.size = seed, length, image_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        rng = sample_rng(TRAIN_SEED_BASE + self.seed, i)
        image, masks, _ = generate_sample(rng, self.size)
        while not masks:  # rare: every object occluded; draw again from the same stream
            image, masks, _ = generate_sample(rng, self.size)
        pick = rng.choice(len(masks), size=PROMPTS_PER_IMAGE, replace=len(masks) < PROMPTS_PER_IMAGE)
        gts = np.stack([masks[k] for k in pick])
        boxes = np.stack([jitter_box(rng, box_xyxy(m), self.size) for m in gts])
        pts = [sample_points(rng, m, MAX_POINTS) for m in gts]
        return (torch.from_numpy(image), torch.from_numpy(gts),
                torch.from_numpy(boxes), torch.from_numpy(np.stack([p[0] for p in pts])),
                torch.from_numpy(np.stack([p[1] for p in pts])))


# ------------------------------------------------------------------------------------------- model
def embed_prompts(sam, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SAM's sparse prompt embedding for points/box corners in the ONNX convention (labels -1..3)."""
    pe = sam.prompt_encoder
    emb = pe.pe_layer._pe_encoding((coords + 0.5) / sam.image_encoder.img_size)
    lab = labels.unsqueeze(-1)
    emb = emb * (lab != -1).to(emb.dtype) + pe.not_a_point_embed.weight * (lab == -1).to(emb.dtype)
    for i in range(pe.num_point_embeddings):
        emb = emb + pe.point_embeddings[i].weight * (lab == i).to(emb.dtype)
    return emb


def decode_batched(sam, image_embeddings: torch.Tensor, per_image: int, coords: torch.Tensor, labels: torch.Tensor):
    """MaskDecoder.predict_masks for many images at once: prompt j uses image j // per_image.

    Same modules and arithmetic as segment-anything's predict_masks (which repeats a single image
    embedding for all its prompts)."""
    md = sam.mask_decoder
    sparse = embed_prompts(sam, coords, labels)
    n = sparse.shape[0]
    out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0).unsqueeze(0).expand(n, -1, -1)
    tokens = torch.cat((out_tokens, sparse.to(out_tokens.dtype)), 1)
    src = image_embeddings.repeat_interleave(per_image, 0)
    src = src + sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    pos = sam.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = md.transformer(src, pos, tokens)
    iou_out, mask_out = hs[:, 0], hs[:, 1:1 + md.num_mask_tokens]
    up = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([md.output_hypernetworks_mlps[i](mask_out[:, i]) for i in range(md.num_mask_tokens)], 1)
    b, c, h, w = up.shape
    masks = (hyper @ up.reshape(b, c, h * w)).reshape(b, -1, h, w)
    return masks, md.iou_prediction_head(iou_out)


def make_prompts(kind: str, n_points: int, boxes: torch.Tensor, pts: torch.Tensor, plabels: torch.Tensor):
    """(coords [N,T,2], labels [N,T]) for box prompts or n_points points + SAM's padding point."""
    n = boxes.shape[0]
    if kind == "box":
        return boxes.view(n, 2, 2), torch.tensor([2.0, 3.0], device=boxes.device).expand(n, 2)
    c = torch.cat([pts[:, :n_points], torch.zeros(n, 1, 2, device=pts.device)], 1)
    lab = torch.cat([plabels[:, :n_points], -torch.ones(n, 1, device=pts.device)], 1)
    return c, lab


def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """[B,H,W,3] uint8 RGB -> [B,3,H,W] normalised as SamPredictor does (square images need no padding)."""
    x = images_u8.permute(0, 3, 1, 2).float()
    return (x - PIXEL_MEAN.to(x.device)) / PIXEL_STD.to(x.device)


def upsample_logits(low: torch.Tensor, size: int) -> torch.Tensor:
    """SAM's postprocess for a square input already at model size: bilinear to image size."""
    return F.interpolate(low, (size, size), mode="bilinear", align_corners=False)


def mask_losses(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-prompt BCE x20 + Dice; logits [N,S,S] float32, gt [N,S,S] float."""
    bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none").mean((1, 2))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * gt).sum((1, 2)) + 1) / (p.sum((1, 2)) + gt.sum((1, 2)) + 1)
    return 20 * bce + dice


def iou_of(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    inter = (pred & gt).flatten(-2).sum(-1).float()
    union = (pred | gt).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


# ------------------------------------------------------------------------------------------ metrics
def validation_set(seed: int, num_images: int, image_size: int, workers: int = 8):
    """[(image uint8 HxWx3, [masks], [cats])] of the set with `seed` (as write_synthetic_coco draws it)."""
    from concurrent.futures import ProcessPoolExecutor
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            return list(ex.map(_val_item, [(seed, i, image_size) for i in range(num_images)], chunksize=8))
    return [_val_item((seed, i, image_size)) for i in range(num_images)]


def _val_item(args):
    seed, i, size = args
    return generate_sample(sample_rng(seed, i), size)


def center_point(mask: np.ndarray) -> np.ndarray:
    """The mask pixel farthest from its boundary (the usual single-click evaluation prompt)."""
    from scipy.ndimage import distance_transform_edt
    d = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return np.array([x, y], dtype=np.float32)


@torch.no_grad()
def evaluate(sam, data, device, prompt: str = "box", batch_images: int = 16, amp: bool = True) -> dict:
    """mIoU and AP-like (mean over IoU thresholds .50:.05:.95 of the share of instances above it) with
    ground-truth boxes (prompt='box') or each instance's centre point plus the padding point ('point')."""
    sam.eval()
    size = sam.image_encoder.img_size
    ious = []
    for s in range(0, len(data), batch_images):
        chunk = [d for d in data[s:s + batch_images]]
        imgs = torch.from_numpy(np.stack([d[0] for d in chunk])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            emb = sam.image_encoder(normalise(imgs))
        for j, d in enumerate(chunk):
            if not d[1]:
                continue
            gts = torch.from_numpy(np.stack(d[1])).to(device)
            if prompt == "box":
                coords = torch.from_numpy(np.stack([box_xyxy(m) for m in d[1]])).to(device).view(-1, 2, 2)
                labels = torch.tensor([2.0, 3.0], device=device).expand(len(d[1]), 2)
            else:
                pts = torch.from_numpy(np.stack([center_point(m) for m in d[1]])).to(device)
                coords = torch.stack([pts, torch.zeros_like(pts)], 1)
                labels = torch.tensor([1.0, -1.0], device=device).expand(len(d[1]), 2)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                low, _ = decode_batched(sam, emb[j:j + 1].expand(1, -1, -1, -1), len(d[1]), coords, labels)
            pred = upsample_logits(low[:, :1].float(), size)[:, 0] > 0
            ious.append(iou_of(pred, gts).cpu())
    ious = torch.cat(ious)
    thr = torch.arange(0.5, 0.951, 0.05)
    return {"instances": int(ious.numel()), "miou": float(ious.mean()),
            "ap_like": float(100 * (ious[None] > thr[:, None]).float().mean())}


# -------------------------------------------------------------------------------------------- train
def fp16_state_dict(sam) -> dict[str, torch.Tensor]:
    """The bundled form: a plain Sam state dict with float tensors stored as fp16."""
    return {k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()
            for k, v in sam.state_dict().items()}


def train_step(sam, opt, batch, kind: str, n_points: int, device, amp: bool):
    imgs, gts, boxes, pts, plabels = batch
    size = sam.image_encoder.img_size
    imgs = imgs.to(device, non_blocking=True)
    gts = gts.to(device, non_blocking=True).flatten(0, 1).float()
    boxes, pts, plabels = (t.to(device, non_blocking=True).flatten(0, 1) for t in (boxes, pts, plabels))
    coords, labels = make_prompts(kind, n_points, boxes, pts, plabels)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        emb = sam.image_encoder(normalise(imgs))
        low, iou_pred = decode_batched(sam, emb, PROMPTS_PER_IMAGE, coords, labels)
    logits = upsample_logits(low.float(), size)                                  # [N,4,S,S]
    per = torch.stack([mask_losses(logits[:, j], gts) for j in range(4)], 1)    # [N,4]
    loss_single = per[:, 0].mean()
    loss_multi = per[:, 1:].min(1).values.mean()
    with torch.no_grad():
        true_iou = iou_of(logits > 0, gts[:, None].bool())
    loss_iou = F.mse_loss(iou_pred.float(), true_iou)
    loss = loss_single + loss_multi + loss_iou
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
    opt.step()
    return loss.detach(), loss_single.detach(), loss_multi.detach(), loss_iou.detach(), true_iou, gnorm.detach()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch-images", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--time-limit", type=float, default=0.0, help="seconds; stop and write --checkpoint when exceeded")
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/reference_ckpt.pt"))
    ap.add_argument("--resume", type=Path, default=None, help="continue from a --checkpoint written at a time limit")
    ap.add_argument("--init-weights", type=Path, default=None,
                    help="start a new stage from a finished run's fp16 reference_sam.pt (fresh optimizer and schedule; "
                         "use another --seed so the stage draws new images)")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    arch = ARCHS["reference"]
    size = arch.image_size
    sam = build_sam_arch(arch)
    if args.init_weights is not None:
        load_checkpoint_into(sam, "reference", args.init_weights)   # fp16 values copied into the fp32 params
        print(f"initialised from {args.init_weights}", flush=True)
    sam = sam.to(device).train()
    n_params = sum(p.numel() for p in sam.parameters())
    print(f"reference SAM: {n_params / 1e6:.2f} M params; device {device}", flush=True)

    start_step = 0
    ds = SynthTrainSet(args.seed, args.steps * args.batch_images, size)
    decay = [p for n, p in sam.named_parameters() if p.ndim >= 2 and "pos" not in n]
    no_decay = [p for n, p in sam.named_parameters() if not (p.ndim >= 2 and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05,
                                                anneal_strategy="cos", div_factor=20, final_div_factor=100)
    log, prior_train_s = [], 0.0
    if args.resume is not None:
        ck = torch.load(args.resume, map_location=device, weights_only=False)
        sam.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start_step, log, prior_train_s = ck["step"], ck["log"], ck["train_s"]
        print(f"resumed at step {start_step}", flush=True)
        ds = torch.utils.data.Subset(ds, range(start_step * args.batch_images, len(ds)))
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_images, shuffle=False, num_workers=args.workers,
                                     pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0,
                                     prefetch_factor=8 if args.workers > 0 else None)
    amp = device.type == "cuda"
    window = []
    t_train = time.time()
    for step, batch in enumerate(dl, start=start_step):
        step_rng = np.random.default_rng([args.seed, 7, step])
        kind = "box" if step_rng.random() < 0.5 else "points"
        n_points = int(step_rng.integers(1, MAX_POINTS + 1))
        loss, loss_single, loss_multi, loss_iou, true_iou, gnorm = train_step(sam, opt, batch, kind, n_points, device, amp)
        sched.step()
        window.append(torch.stack([loss.detach(), loss_single.detach(), loss_multi.detach(), loss_iou.detach(),
                                   true_iou[:, 0].mean(), gnorm.detach()]))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            w = torch.stack(window).mean(0).tolist()
            window = []
            rec = {"step": step + 1, "loss": w[0], "loss_single": w[1], "loss_multi": w[2], "loss_iou": w[3],
                   "train_iou": w[4], "grad_norm": w[5], "lr": sched.get_last_lr()[0],
                   "elapsed_s": round(prior_train_s + time.time() - t_train, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if args.time_limit and time.time() - t_start > args.time_limit and step + 1 < args.steps:
            ck = {"model": sam.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1,
                  "log": log, "train_s": prior_train_s + time.time() - t_train}
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ck, args.checkpoint)
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(fp16_state_dict(sam), args.out / "reference_sam_partial.pt")
            print(f"time limit: stopped after step {step + 1}; resume with --resume {args.checkpoint}", flush=True)
            return 3
    train_s = prior_train_s + time.time() - t_train

    sam.eval()
    val = validation_set(VAL_SEED, args.val_images, size, workers=min(8, max(1, args.workers)))
    metrics = {"box": evaluate(sam, val, device, "box"), "point": evaluate(sam, val, device, "point")}
    print(json.dumps({"validation": metrics}), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(fp16_state_dict(sam), args.out / "reference_sam.pt")
    record = {
        "command": "python tools/train_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "arch": {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.__dict__.items()},
        "params_m": round(n_params / 1e6, 3),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "init_weights": str(args.init_weights) if args.init_weights else None,
        "seed": args.seed,
        "train_data": f"synth seeds ({TRAIN_SEED_BASE + args.seed}, i) for i < {args.steps * args.batch_images}",
        "steps": args.steps, "batch_images": args.batch_images, "prompts_per_image": PROMPTS_PER_IMAGE,
        "prompt_mix": "per step: 50% jittered boxes (5% of side), 50% 1-3 points (+padding point)",
        "loss": "BCE x20 + Dice (single output) + same on best multimask output + MSE IoU head",
        "optimizer": {"name": "AdamW", "max_lr": args.lr, "weight_decay": args.weight_decay,
                      "schedule": "one-cycle cos, 5% warm-up",
                      "grad_clip": 1.0, "amp": "bf16" if amp else "fp32"},
        "train_time_s": round(train_s, 1), "total_time_s": round(time.time() - t_start, 1),
        "final_losses": log[-1] if log else None, "log": log,
        "validation": {"seed": VAL_SEED, "images": args.val_images, **metrics,
                       "note": "ap_like = mean over IoU .50:.95 of the share of instances above it; GT boxes; "
                               "COCO segm mAP is measured separately with pycocotools (docs/benchmarks.md)"},
        "determinism": "all randomness seeded from --seed; GPU kernels can still change the last bits between runs",
    }
    (args.out / "reference_training.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
