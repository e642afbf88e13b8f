"""Build segment-anything SAM models: official vit_b/l/h (checkpoint or random init) and the bundled reference."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # segment-anything imports torchvision (~3 s): only when a model is built
    from segment_anything.modeling import Sam

from ..errors import CheckpointError, InputError


@dataclass(frozen=True)
class SamArch:
    """The shape of a SAM model: what segment-anything's build_sam_* functions hard-code, as data."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mlp_ratio: float = 4.0


ARCHS: dict[str, SamArch] = {
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
    # The project's trained reference model (see tools/train_reference.py and docs/benchmarks.md):
    # vit_b's depth, global-attention layout and head width, at width 384 and 256 px input.
    "reference": SamArch(384, 12, 6, (2, 5, 8, 11), image_size=256, window_size=8),
}

REFERENCE_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "reference_sam.pt"


def build_sam_arch(arch: SamArch) -> Sam:
    """A SAM with segment-anything's own classes and its default initialisation."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embed = arch.prompt_embed_dim
    grid = arch.image_size // arch.patch_size
    encoder = ImageEncoderViT(
        depth=arch.encoder_depth,
        embed_dim=arch.encoder_embed_dim,
        img_size=arch.image_size,
        mlp_ratio=arch.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=arch.encoder_num_heads,
        patch_size=arch.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=arch.encoder_global_attn_indexes,
        window_size=arch.window_size,
        out_chans=embed,
    )
    prompt = PromptEncoder(
        embed_dim=embed,
        image_embedding_size=(grid, grid),
        input_image_size=(arch.image_size, arch.image_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=embed, mlp_dim=2048, num_heads=8),
        transformer_dim=embed,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
              pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def randomize_zero_initialised(sam: Sam, seed: int) -> None:
    """segment-anything leaves pos_embed and rel_pos_* at zero; give them realistic random values."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if name.endswith("pos_embed") or ".rel_pos_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch state-dict file ({type(e).__name__}); "
                              "expected an official sam_vit_*.pth") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a SAM state dict (expected a mapping of parameter names to tensors)")
    return sd


def guess_model_type(sd: dict[str, torch.Tensor]) -> str | None:
    w = sd.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return None
    by_dim = {a.encoder_embed_dim: k for k, a in ARCHS.items() if k != "reference"}
    return by_dim.get(int(w.shape[0]))


def check_state_dict(sd: dict[str, torch.Tensor], own_shapes: dict[str, tuple], model_type: str, path: Path) -> None:
    """CheckpointError (one line) unless `sd` holds every tensor of the model with its shape."""
    missing = sorted(set(own_shapes) - set(sd))
    mismatched = [k for k in own_shapes if k in sd and tuple(sd[k].shape) != tuple(own_shapes[k])]
    if mismatched or missing:
        guess = guess_model_type(sd)
        hint = f" (it looks like a {guess} checkpoint)" if guess and guess != model_type else ""
        what = (f"{len(mismatched)} tensors of the wrong shape, e.g. {mismatched[0]} {tuple(sd[mismatched[0]].shape)} "
                f"vs {tuple(own_shapes[mismatched[0]])}") if mismatched else f"{len(missing)} missing tensors, e.g. {missing[0]}"
        raise CheckpointError(f"checkpoint {path} does not fit --model-type {model_type}: {what}{hint}")


def arch_shapes(arch: SamArch) -> dict[str, tuple]:
    """Parameter and buffer shapes of a SAM of `arch`, without allocating or initialising it (meta device)."""
    with torch.device("meta"):
        sam = build_sam_arch(arch)
    return {k: tuple(v.shape) for k, v in sam.state_dict().items()}


def load_checkpoint_into(sam: Sam, model_type: str, path: Path, sd: dict[str, torch.Tensor] | None = None) -> None:
    sd = read_state_dict(path) if sd is None else sd
    own = sam.state_dict()
    check_state_dict(sd, {k: tuple(v.shape) for k, v in own.items()}, model_type, path)
    sam.load_state_dict({k: sd[k] for k in own}, strict=True)


@dataclass(frozen=True)
class BuiltSam:
    sam: Sam
    model_type: str
    provenance: dict[str, str]  # goes into ONNX metadata


def build_sam(model_type: str, checkpoint: str | Path | None = None, seed: int | None = None) -> BuiltSam:
    """SAM from an official checkpoint, random init with a seed, or the bundled reference weights."""
    if model_type not in ARCHS:
        raise InputError(f"unknown --model-type {model_type!r}; choose one of {', '.join(ARCHS)}")
    arch = ARCHS[model_type]
    if checkpoint is not None and seed is not None:
        raise InputError("give either --checkpoint or --random-init, not both")
    if model_type == "reference" and checkpoint is None and seed is None:
        if not REFERENCE_WEIGHTS.is_file():
            raise CheckpointError(f"the bundled reference weights are missing ({REFERENCE_WEIGHTS}); reinstall carsam-onnx")
        checkpoint = REFERENCE_WEIGHTS
    if checkpoint is None and seed is None:
        raise InputError(f"--model-type {model_type} needs --checkpoint PATH (official sam_{model_type}_*.pth) "
                         "or --random-init --seed N")
    sd = None
    if checkpoint is not None:   # a bad checkpoint fails before the (large) model is built
        sd = read_state_dict(Path(checkpoint))
        check_state_dict(sd, arch_shapes(arch), model_type, Path(checkpoint))
    if seed is not None:
        torch.manual_seed(seed)
    sam = build_sam_arch(arch)
    if checkpoint is not None:
        path = Path(checkpoint)
        load_checkpoint_into(sam, model_type, path, sd)
        prov = {"checkpoint": path.name, "checkpoint_sha256": sha256_of(path)}
    else:
        randomize_zero_initialised(sam, seed)
        prov = {"random_seed": str(seed)}
    return BuiltSam(sam.float().eval(), model_type, prov)
