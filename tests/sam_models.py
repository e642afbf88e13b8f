"""Exported SAM graphs for tests, built once and cached on disk under CARSAM_TEST_CACHE.

The cache key includes the package's export code hash, so a change to export/ rebuilds the files. Test workers
(pytest -n) that need the same graph at once take turns through a lock file: one exports, the others wait and
read its file, instead of each exporting it again (a vit_b export costs about a minute of the CI machine).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import warnings
from pathlib import Path

import torch

from carsam_onnx.export.models import build_sam
from carsam_onnx.export.onnx_export import export_onnx
from carsam_onnx.modelio import save_model

CACHE = Path(os.environ.get("CARSAM_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "test_models"))
_EXPORT_DIR = Path(__file__).resolve().parent.parent / "carsam_onnx" / "export"


def _code_hash() -> str:
    """Hash of what decides an exported graph's content: the wrappers, the exporter, the builders."""
    import inspect

    from carsam_onnx.export import models

    h = hashlib.sha256()
    for name in ("wrappers.py", "onnx_export.py"):
        h.update((_EXPORT_DIR / name).read_bytes())
    for fn in (models.build_sam_arch, models.randomize_zero_initialised):
        h.update(inspect.getsource(fn).encode())
    h.update(repr({k: v for k, v in models.ARCHS.items() if k != "reference"}).encode())
    return h.hexdigest()[:10]


@contextlib.contextmanager
def cache_lock(path: Path):
    """Exclusive lock on PATH's cache entry while it is being built (a PATH.lock file beside it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sam_onnx_path(model_type: str = "vit_b", part: str = "full", exporter: str = "dynamo", seed: int = 0,
                  multimask: bool = False) -> Path:
    """Path of an exported random-init SAM graph (exported on first use)."""
    name = f"{model_type}_{part}_{exporter}_s{seed}_{'mm' if multimask else 'sm'}_{_code_hash()}.onnx"
    path = CACHE / name
    if not path.exists():
        with cache_lock(path):
            if not path.exists():
                built = build_sam(model_type, seed=seed)
                model = export_onnx(built, part=part, exporter=exporter, multimask=multimask)
                save_model(model, path, force=True)   # atomic; external data (PATH.data) above ~1.8 GB
    return path


def reference_onnx_path(part: str = "full", exporter: str = "dynamo") -> Path:
    """The bundled trained reference model exported as `carsam-onnx export --model-type reference` does (the same
    build_sam + export_onnx), cached; shared by every test that needs the trained graph. The caller skips when
    the weights are missing (export.models.REFERENCE_WEIGHTS)."""
    from carsam_onnx.export.models import REFERENCE_WEIGHTS

    tag = hashlib.sha256(REFERENCE_WEIGHTS.read_bytes()).hexdigest()[:10]
    suffix = "" if exporter == "dynamo" else f"_{exporter}"
    path = CACHE / f"reference_trained_{part}{suffix}_{tag}_{_code_hash()}.onnx"
    if not path.exists():
        with cache_lock(path):
            if not path.exists():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    save_model(export_onnx(build_sam("reference"), part, exporter=exporter), path, force=True)
    return path


def official_decoder_path(model_type: str = "vit_b", seed: int = 0) -> Path:
    """segment-anything's own decoder export (SamOnnxModel, TorchScript exporter, opset 17), as its
    scripts/export_onnx_model.py makes it: inputs image_embeddings, point_coords, point_labels,
    mask_input, has_mask_input, orig_im_size."""
    path = CACHE / f"official_decoder_{model_type}_s{seed}_{_code_hash()}.onnx"
    if path.exists():
        return path
    with cache_lock(path):
        if not path.exists():
            _export_official_decoder(model_type, seed, path)
    return path


def _export_official_decoder(model_type: str, seed: int, path: Path) -> None:
    from segment_anything.utils.onnx import SamOnnxModel

    sam = build_sam(model_type, seed=seed).sam
    onnx_model = SamOnnxModel(sam, return_single_mask=True)
    embed_size = sam.prompt_encoder.image_embedding_size
    dummy = {
        "image_embeddings": torch.randn(1, 256, *embed_size, dtype=torch.float),
        "point_coords": torch.randint(low=0, high=1024, size=(1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, 4 * embed_size[0], 4 * embed_size[1], dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(onnx_model, tuple(dummy.values()), str(tmp), dynamo=False, export_params=True,
                          verbose=False, opset_version=17, do_constant_folding=True,
                          input_names=list(dummy), output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})
    tmp.rename(path)
