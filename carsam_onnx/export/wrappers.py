"""Export-friendly SAM forward passes: full (image + prompts), encoder, and prompted decoder.

Prompts follow SAM's ONNX convention: points in the S x S input frame with labels
1 (foreground), 0 (background), -1 (padding, "not a point"), and a box as two points labelled
2 (top-left) and 3 (bottom-right). A point-only prompt needs one padding point, as SamPredictor adds.
No mask input: the dense prompt is SAM's no-mask embedding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


class PromptedMaskDecoder(nn.Module):
    """image_embeddings, point_coords, point_labels -> low_res_masks, iou_predictions."""

    def __init__(self, sam: Sam, multimask: bool = False):
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.image_size = sam.image_encoder.img_size
        self.multimask = multimask

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        norm = (coords + 0.5) / self.image_size
        emb = pe.pe_layer._pe_encoding(norm)
        labels = labels.unsqueeze(-1)
        emb = emb * (labels != -1).to(emb.dtype)
        emb = emb + pe.not_a_point_embed.weight * (labels == -1).to(emb.dtype)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (labels == i).to(emb.dtype)
        return emb

    def forward(self, image_embeddings, point_coords, point_labels):
        sparse = self.embed_points(point_coords, point_labels)
        h, w = self.prompt_encoder.image_embedding_size
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
        masks, iou = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        sl = slice(1, None) if self.multimask else slice(0, 1)
        return masks[:, sl], iou[:, sl]


class ImageEncoder(nn.Module):
    """image (normalised and padded as SamPredictor does) -> image_embeddings."""

    def __init__(self, sam: Sam):
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image):
        return self.image_encoder(image)


class FullSam(PromptedMaskDecoder):
    """image, point_coords, point_labels -> low_res_masks, iou_predictions.

    Submodules keep Sam's names (image_encoder, prompt_encoder, mask_decoder), so ONNX node names of the
    full and the split models carry the same module paths."""

    def __init__(self, sam: Sam, multimask: bool = False):
        super().__init__(sam, multimask)
        self.image_encoder = sam.image_encoder

    def forward(self, image, point_coords, point_labels):
        return super().forward(self.image_encoder(image), point_coords, point_labels)


def reference_forward(sam: Sam, image: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                      multimask: bool = False):
    """segment-anything's own path (Sam modules called as SamPredictor does), for conformance tests.

    Boxes (labels 2/3 pairs) go through PromptEncoder's box path, other points through its point path
    (a padding point is expected in `labels` already, as in the ONNX convention).
    """
    with torch.no_grad():
        emb = sam.image_encoder(image)
        is_box = labels[0] >= 2
        boxes = coords[:, is_box].reshape(1, -1, 4) if bool(is_box.any()) else None
        pts = (coords[:, ~is_box], labels[:, ~is_box]) if bool((~is_box).any()) else None
        if pts is not None and boxes is not None:
            raise ValueError("reference_forward: mix of box and points not supported here")
        if boxes is not None:
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[0], masks=None)
        else:
            # PromptEncoder pads itself when boxes is None; our labels carry the pad already -> drop it.
            real = pts[1][0] != -1
            sparse, dense = sam.prompt_encoder(points=(pts[0][:, real], pts[1][:, real]), boxes=None, masks=None)
        masks, iou = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    return masks, iou
