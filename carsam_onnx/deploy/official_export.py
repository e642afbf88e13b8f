"""Write segment-anything's own decoder export (its ``SamOnnxModel`` wrapper, TorchScript exporter, opset 17,
single mask) for a model this project can build: what users of the official repository hold. Used by
tools/bench_official_decoder.py to compare it with the project's own split export of the same weights."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch

from ..export.models import build_sam
from ..modelio import check_writable, save_model

OFFICIAL_OPSET = 17
OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")


def official_decoder(sam) -> onnx.ModelProto:
    """The decoder graph as segment-anything's scripts/export_onnx_model.py writes it (return_single_mask)."""
    from segment_anything.utils.onnx import SamOnnxModel

    h, w = sam.prompt_encoder.image_embedding_size
    size = sam.image_encoder.img_size
    dummy = {
        "image_embeddings": torch.randn(1, sam.prompt_encoder.embed_dim, h, w),
        "point_coords": torch.tensor([[[size * 0.1, size * 0.2], [size * 0.6, size * 0.7]]]),
        "point_labels": torch.tensor([[2.0, 3.0]]),
        "mask_input": torch.zeros(1, 1, 4 * h, 4 * w),
        "has_mask_input": torch.tensor([0.0]),
        "orig_im_size": torch.tensor([float(size), float(size)]),
    }
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(SamOnnxModel(sam, return_single_mask=True), tuple(dummy.values()), buf, dynamo=False,
                          opset_version=OFFICIAL_OPSET, do_constant_folding=True, input_names=list(dummy),
                          output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})
    return onnx.load_from_string(buf.getvalue())


def export_official_decoder(output: str | Path, model_type: str = "reference", checkpoint: str | None = None,
                            seed: int | None = None, force: bool = False) -> Path:
    output = Path(output)
    check_writable(output, force, inputs=[checkpoint])
    built = build_sam(model_type, checkpoint=checkpoint, seed=seed)
    model = official_decoder(built.sam.eval())
    save_model(model, output, force=force)
    return output
