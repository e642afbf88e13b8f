"""A tiny random-init SAM (128 px input, width 64, 2 blocks; SAM's own prompt encoder and mask decoder),
exported once as full / encoder / decoder graphs and as segment-anything's official decoder, cached on disk
next to tests/sam_models.py's exports."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sam_models import CACHE, _code_hash, cache_lock  # noqa: E402

from carsam_onnx.export.models import BuiltSam, SamArch, build_sam_arch  # noqa: E402
from carsam_onnx.export.onnx_export import export_onnx  # noqa: E402

TINY = SamArch(64, 2, 2, (1,), image_size=128, window_size=4)


def _built(seed: int) -> BuiltSam:
    torch.manual_seed(seed)
    return BuiltSam(build_sam_arch(TINY), "tiny", {"random_seed": str(seed)})


def _save(model: onnx.ModelProto, path: Path) -> Path:
    tmp = path.with_suffix(f".{os.getpid()}.{id(model)}.tmp")
    onnx.save_model(model, str(tmp))
    tmp.rename(path)
    return path


def tiny_sam_paths(seed: int = 0) -> dict[str, Path]:
    """{"full", "encoder", "decoder", "official_decoder"} -> ONNX path (same weights in all four)."""
    paths = {p: CACHE / f"tiny_{p}_s{seed}_{_code_hash()}.onnx" for p in ("full", "encoder", "decoder", "official_decoder")}
    if all(p.exists() for p in paths.values()):
        return paths
    with cache_lock(paths["full"]):
        if all(p.exists() for p in paths.values()):    # another test worker built them meanwhile
            return paths
        built = _built(seed)
        for part in ("full", "encoder", "decoder"):
            if not paths[part].exists():
                _save(export_onnx(built, part=part), paths[part])
        if not paths["official_decoder"].exists():
            _save(_official_decoder(built.sam), paths["official_decoder"])
    return paths


def _official_decoder(sam) -> onnx.ModelProto:
    import io

    from segment_anything.utils.onnx import SamOnnxModel

    g = sam.prompt_encoder.image_embedding_size
    dummy = {
        "image_embeddings": torch.randn(1, 256, *g),
        "point_coords": torch.tensor([[[10.0, 20.0], [60.0, 90.0]]]),
        "point_labels": torch.tensor([[2.0, 3.0]]),
        "mask_input": torch.zeros(1, 1, 4 * g[0], 4 * g[1]),
        "has_mask_input": torch.tensor([0.0]),
        "orig_im_size": torch.tensor([100.0, 150.0]),
    }
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SamOnnxModel(sam, return_single_mask=True), tuple(dummy.values()), buf, dynamo=False,
                          opset_version=17, do_constant_folding=True, input_names=list(dummy),
                          output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})
    return onnx.load_from_string(buf.getvalue())
