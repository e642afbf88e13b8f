"""The bundled reference model: its weights load, it segments, and its decoder's cross-attention looks at the
prompted object.

Quality is checked through segment-anything's own SamPredictor (not the project's export or training code),
on a small synthetic validation set (seed 2, the validation seed; training used seeds >= 1000). The
acceptance figures on 200 images are in docs/benchmarks.md.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import MaskDecoder

from carsam_onnx.data.synth import generate_sample, sample_rng
from carsam_onnx.export.models import ARCHS, REFERENCE_WEIGHTS, build_sam

VAL_SEED = 2
NUM_IMAGES = 20


def _box_xyxy(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


@pytest.fixture(scope="module")
def sam():
    if not REFERENCE_WEIGHTS.is_file():
        pytest.skip(f"bundled reference weights not present at {REFERENCE_WEIGHTS}")
    torch.set_grad_enabled(False)
    yield build_sam("reference").sam
    torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def val_set():
    return [generate_sample(sample_rng(VAL_SEED, i), ARCHS["reference"].image_size) for i in range(NUM_IMAGES)]


def test_bundled_weights_are_fp16_and_small():
    if not REFERENCE_WEIGHTS.is_file():
        pytest.skip(f"bundled reference weights not present at {REFERENCE_WEIGHTS}")
    assert REFERENCE_WEIGHTS.stat().st_size <= 60 * 2 ** 20
    sd = torch.load(REFERENCE_WEIGHTS, map_location="cpu", weights_only=True)
    floats = [v for v in sd.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert sd["image_encoder.patch_embed.proj.weight"].shape[0] == ARCHS["reference"].encoder_embed_dim


def test_build_sam_reference_loads_trained_weights(sam):
    built = build_sam("reference")
    assert "checkpoint_sha256" in built.provenance
    assert next(sam.parameters()).dtype == torch.float32
    # Trained, not initial: segment-anything initialises pos_embed and rel_pos_* to zero.
    assert float(sam.image_encoder.pos_embed.abs().mean()) > 1e-3
    assert float(sam.image_encoder.blocks[2].attn.rel_pos_h.abs().mean()) > 1e-3


def _token_to_image_attention(module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights [B, heads, tokens, image cells] of a decoder Attention given its q/k inputs."""
    qp = module._separate_heads(module.q_proj(q), module.num_heads)
    kp = module._separate_heads(module.k_proj(k), module.num_heads)
    return torch.softmax(qp @ kp.transpose(-1, -2) / qp.shape[-1] ** 0.5, dim=-1)


ATTENTION_IMAGES = 6
POINT_IMAGES = 10


@pytest.fixture(scope="module")
def predictions(sam, val_set):
    """One SamPredictor pass over the validation images (each image encoded once): box-prompt IoUs (all
    images), single-click IoUs (first POINT_IMAGES), and, for the first ATTENTION_IMAGES, the attention mass
    each decoder token puts inside the box relative to the box's share of the grid (hooks on the decoder's
    token->image attentions)."""
    from scipy.ndimage import distance_transform_edt

    dec: MaskDecoder = sam.mask_decoder
    modules = {"layers.1.cross_attn_token_to_image": dec.transformer.layers[1].cross_attn_token_to_image,
               "final_attn_token_to_image": dec.transformer.final_attn_token_to_image}
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args, kwargs, out):
            captured[name] = _token_to_image_attention(mod, kwargs["q"], kwargs["k"])
        return fn

    grid = sam.prompt_encoder.image_embedding_size[0]
    centres = (np.arange(grid) + 0.5) * sam.image_encoder.img_size / grid
    out = {"box": [], "point": [], "attention": {n: [] for n in modules}}
    predictor = SamPredictor(sam)
    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        for i, (image, masks, _) in enumerate(val_set):
            if not masks:
                continue
            predictor.set_image(image)
            for m in masks:
                box = _box_xyxy(m)
                captured.clear()
                pred, _, _ = predictor.predict(box=box, multimask_output=False)
                out["box"].append(np.logical_and(pred[0], m).sum() / np.logical_or(pred[0], m).sum())
                inside = np.outer((centres >= box[1]) & (centres < box[3]), (centres >= box[0]) & (centres < box[2]))
                if i < ATTENTION_IMAGES and inside.any() and not inside.all():
                    sel = torch.from_numpy(inside.reshape(-1))
                    for name, attn in captured.items():  # attn [1, heads, tokens, cells]
                        mass = attn[0][:, :, sel].sum(-1).mean(0).numpy()  # per token, mean over heads
                        out["attention"][name].append(mass / inside.mean())
                if i < POINT_IMAGES:
                    d = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
                    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
                    pred, _, _ = predictor.predict(point_coords=np.array([[x, y]], np.float32),
                                                   point_labels=np.array([1]), multimask_output=False)
                    out["point"].append(np.logical_and(pred[0], m).sum() / np.logical_or(pred[0], m).sum())
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.slow  # one shared SamPredictor pass over 20 images: 116 s measured on the loaded 2-core dev machine
def test_box_prompt_quality_through_sam_predictor(predictions):
    """mIoU >= 0.85 with ground-truth boxes, the acceptance bar (the 200-image figure is 0.885; a random-init
    model gets < 0.1)."""
    ious = np.array(predictions["box"])
    assert len(ious) >= 60
    assert ious.mean() >= 0.85, f"mIoU {ious.mean():.3f} with ground-truth boxes on {len(ious)} instances"
    assert np.mean(ious > 0.5) >= 0.9


@pytest.mark.slow
def test_point_prompt_segments_the_clicked_object(predictions):
    """One positive click at the object's most interior pixel: mIoU >= 0.78 (200 images: 0.864)."""
    ious = np.array(predictions["point"])
    assert len(ious) >= 30
    assert ious.mean() >= 0.78, f"point-prompt mIoU {ious.mean():.3f} on {len(ious)} instances"


@pytest.mark.slow
def test_token_to_image_attention_concentrates_in_the_box(sam, predictions):
    """The decoder's token->image cross-attention puts its mass inside the prompted object's box.

    For every token (IoU token, mask tokens, the two box-corner tokens), averaged over heads and instances,
    the attention mass inside the box is more than 2x the box's share of the 16x16 grid (uniform attention:
    1x) in the second TwoWayAttentionBlock and in the final token->image attention (measured: about 20x).
    The first block's cross-attention is broad (about 1.3x for the mask token, 2.2-2.5x for the box
    corners) and is not asserted."""
    for name, r in predictions["attention"].items():
        assert len(r) >= 20
        per_token = np.mean(np.stack(r), 0)
        assert per_token.shape[0] == 1 + sam.mask_decoder.num_mask_tokens + 2  # IoU, mask tokens, box corners
        assert per_token.min() > 2.0, f"{name}: attention mass in the box per token is {np.round(per_token, 2)}x uniform"
