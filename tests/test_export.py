"""ONNX export matches segment-anything's own torch forward (ORT, fp32, random-init weights)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from carsam_onnx.export.models import build_sam
from carsam_onnx.export.onnx_export import get_metadata
from carsam_onnx.export.wrappers import reference_forward
from sam_models import sam_onnx_path

TOL = 1e-4  # max abs diff on mask logits / IoU predictions (issue 2 acceptance)


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


PROMPTS = {
    "box": (np.array([[[100.0, 200.0], [600.0, 900.0]]], np.float32), np.array([[2.0, 3.0]], np.float32)),
    "points": (np.array([[[300.0, 400.0], [700.0, 100.0], [0.0, 0.0]]], np.float32),
               np.array([[1.0, 0.0, -1.0]], np.float32)),
}


def decoder_reference(sam, emb, coords, labels, multimask=False):
    """segment-anything's prompt encoder + mask decoder on precomputed embeddings (as SamPredictor after
    set_image): boxes through the box path, points through the point path (padding point dropped, SAM re-adds it)."""
    coords, labels = torch.from_numpy(coords), torch.from_numpy(labels)
    with torch.no_grad():
        is_box = labels[0] >= 2
        if bool(is_box.any()):
            sparse, dense = sam.prompt_encoder(points=None, boxes=coords[:, is_box].reshape(1, 4), masks=None)
        else:
            real = labels[0] != -1
            sparse, dense = sam.prompt_encoder(points=(coords[:, real], labels[:, real]), boxes=None, masks=None)
        return sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask)


@pytest.fixture(scope="module")
def vit_b():
    torch.manual_seed(123)
    image = torch.randn(1, 3, 1024, 1024)
    sam = build_sam("vit_b", seed=0).sam
    with torch.no_grad():
        emb = sam.image_encoder(image)
    return sam, image, emb


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_full_model_matches_segment_anything(vit_b, exporter):
    sam, image, _ = vit_b
    sess = _session(sam_onnx_path("vit_b", "full", exporter))
    coords, labels = PROMPTS["box"]
    masks, iou = sess.run(None, {"image": image.numpy(), "point_coords": coords, "point_labels": labels})
    ref_masks, ref_iou = reference_forward(sam, image, torch.from_numpy(coords), torch.from_numpy(labels))
    assert masks.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
    assert np.abs(masks - ref_masks.numpy()).max() <= TOL
    assert np.abs(iou - ref_iou.numpy()).max() <= TOL


def test_split_models_match_segment_anything(vit_b):
    sam, image, emb = vit_b
    enc = _session(sam_onnx_path("vit_b", "encoder", "dynamo"))
    dec = _session(sam_onnx_path("vit_b", "decoder", "dynamo"))
    (onnx_emb,) = enc.run(None, {"image": image.numpy()})
    assert onnx_emb.shape == (1, 256, 64, 64)
    assert np.abs(onnx_emb - emb.numpy()).max() <= TOL
    for name, (coords, labels) in PROMPTS.items():
        masks, iou = dec.run(None, {"image_embeddings": emb.numpy(), "point_coords": coords, "point_labels": labels})
        ref_masks, ref_iou = decoder_reference(sam, emb, coords, labels)
        assert np.abs(masks - ref_masks.numpy()).max() <= TOL, name
        assert np.abs(iou - ref_iou.numpy()).max() <= TOL, name


def test_decoder_multimask_and_dynamic_points(vit_b):
    sam, image, emb = vit_b
    dec = _session(sam_onnx_path("vit_b", "decoder", "dynamo", multimask=True))
    rng = np.random.default_rng(0)
    for n in (1, 4, 9):   # N is dynamic; the exported example had N = 2
        coords = (rng.random((1, n, 2)) * 1024).astype(np.float32)
        labels = np.concatenate([rng.integers(0, 2, (1, n - 1)), -np.ones((1, 1))], 1).astype(np.float32)
        masks, iou = dec.run(None, {"image_embeddings": emb.numpy(), "point_coords": coords, "point_labels": labels})
        ref_masks, ref_iou = decoder_reference(sam, emb, coords, labels, multimask=True)
        assert masks.shape == (1, 3, 256, 256)
        assert np.abs(masks - ref_masks.numpy()).max() <= TOL


def test_graph_properties():
    model = onnx.load(str(sam_onnx_path("vit_b", "full", "dynamo")))
    assert model.opset_import[0].version == 21
    onnx.checker.check_model(model, full_check=True)
    meta = get_metadata(model)
    assert meta["model_type"] == "vit_b" and meta["image_size"] == "1024" and meta["random_seed"] == "0"
    names = [n.name for n in model.graph.node]
    assert "/image_encoder.blocks.0.attn/Softmax" in names         # module paths survive in node names
    assert "/mask_decoder.transformer.layers.0.cross_attn_token_to_image/Softmax" in names
    assert [i.name for i in model.graph.input] == ["image", "point_coords", "point_labels"]
    assert [o.name for o in model.graph.output] == ["low_res_masks", "iou_predictions"]


def test_random_init_fills_zero_initialised_tensors():
    sam = build_sam("vit_b", seed=3).sam
    for name, p in sam.named_parameters():
        if name.endswith("pos_embed") or ".rel_pos_" in name:
            assert p.abs().sum() > 0, name
    other = build_sam("vit_b", seed=3).sam
    assert torch.equal(sam.image_encoder.pos_embed, other.image_encoder.pos_embed)   # deterministic per seed


@pytest.mark.slow
@pytest.mark.parametrize("model_type,blocks,size_gb", [("vit_l", 24, 1.2), ("vit_h", 32, 2.5)])
def test_large_encoders_export_and_load(model_type, blocks, size_gb):
    path = sam_onnx_path(model_type, "encoder", "dynamo")
    model = onnx.load(str(path), load_external_data=False)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == blocks
    total = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    assert total > 0.9 * size_gb * 1e9
    sess = _session(path)   # ORT loads it, external data included (vit_h > 2 GB)
    assert [o.name for o in sess.get_outputs()] == ["image_embeddings"]
