"""The Python API the CLI calls: export(), inspect(), quantize(), emit(), evaluate(), synth_dataset()."""
from __future__ import annotations

from pathlib import Path

import onnx

from .config import EvalConfig, ExportConfig, QuantConfig
from .errors import InputError
from .modelio import check_writable, load_model, save_model


def split_paths(out: Path) -> dict[str, Path]:
    """sam_b.onnx -> {"full": sam_b.onnx, "encoder": sam_b.encoder.onnx, "decoder": sam_b.decoder.onnx}."""
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return {"full": out, "encoder": out.with_name(f"{stem}.encoder.onnx"), "decoder": out.with_name(f"{stem}.decoder.onnx")}


def export(output: str | Path, config: ExportConfig = ExportConfig()) -> dict[str, Path]:
    """Build SAM (checkpoint, random init or bundled reference) and write ONNX; returns part -> path."""
    from .export.models import build_sam
    from .export.onnx_export import EXPORTERS, export_onnx

    if config.exporter not in EXPORTERS:
        raise InputError(f"--exporter {config.exporter!r}: choose one of {', '.join(EXPORTERS)}")
    targets = split_paths(Path(output))
    if not config.split:
        targets = {"full": targets["full"]}
    for path in targets.values():        # fail before the long export, never half-way
        check_writable(path, config.force)
    built = build_sam(config.model_type, checkpoint=config.checkpoint, seed=config.seed)
    models = {part: export_onnx(built, part, config.exporter, config.multimask) for part in targets}
    written = []
    try:
        for part, model in models.items():
            written.append(save_model(model, targets[part], force=config.force))
    except BaseException:   # failed or interrupted half-way through the parts: no incomplete set is left
        for path in written:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".data").unlink(missing_ok=True)
        raise
    return targets


def inspect(path: str | Path) -> dict:
    """I/O, opset, op counts, parameters and attention sites of an ONNX model (see summary.py)."""
    from .summary import summarize

    return summarize(load_model(path))


def load(path: str | Path) -> onnx.ModelProto:
    return load_model(path)


def quantize(model_path, output, config: QuantConfig = QuantConfig(), **kwargs):
    """Calibrate and write a Q/DQ model (keyword arguments: see carsam_onnx.quantize.quantize)."""
    from .quantize import quantize as run_quantize

    return run_quantize(model_path, output, config, **kwargs)


def emit(model_path, calibration, output, *, force: bool = False):
    """Write the Q/DQ model from a calibration file saved by quantize(save_calibration=...)."""
    from .quantize import emit as run_emit

    return run_emit(model_path, calibration, output, force=force)


def evaluate(model, config: EvalConfig = EvalConfig(), *, dataset=None, images=None, annotations=None,
             progress: bool = True, **overrides):
    """COCO segm metrics of an ONNX SAM (full model, or [encoder, decoder]) over a COCO-format set.

    The set: `dataset` (a folder with annotations.json and images/) or `images` + `annotations`. Keyword
    `overrides` replace fields of `config` (prompts, limit, runtime, device, min_score).
    """
    from dataclasses import replace

    from .data.coco import load_coco_dataset
    from .eval.runner import evaluate as run_eval

    if dataset is None and (images is None or annotations is None):
        raise InputError("give --dataset DIR, or --images DIR with --annotations FILE.json")
    return run_eval(model, load_coco_dataset(dataset, images, annotations), replace(config, **overrides),
                    progress=progress)


def synth_dataset(output, num_images: int, seed: int, image_size: int | None = None, force: bool = False) -> Path:
    """Write a synthetic COCO-format instance-segmentation set (annotations.json + images/); image_size None:
    data.synth's default."""
    from .data.synth import write_synthetic_coco

    size = {} if image_size is None else {"image_size": image_size}
    return write_synthetic_coco(output, num_images, seed, force=force, **size)
