"""The Python API the CLI calls: export(), inspect(); quantize() and evaluate() join as they land."""
from __future__ import annotations

from pathlib import Path

import onnx

from .config import ExportConfig
from .errors import InputError
from .export.models import build_sam
from .export.onnx_export import EXPORTERS, export_onnx
from .modelio import check_writable, load_model, save_model
from .summary import summarize


def split_paths(out: Path) -> dict[str, Path]:
    """sam_b.onnx -> {"full": sam_b.onnx, "encoder": sam_b.encoder.onnx, "decoder": sam_b.decoder.onnx}."""
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return {"full": out, "encoder": out.with_name(f"{stem}.encoder.onnx"), "decoder": out.with_name(f"{stem}.decoder.onnx")}


def export(output: str | Path, config: ExportConfig = ExportConfig()) -> dict[str, Path]:
    """Build SAM (checkpoint, random init or bundled reference) and write ONNX; returns part -> path."""
    if config.exporter not in EXPORTERS:
        raise InputError(f"--exporter {config.exporter!r}: choose one of {', '.join(EXPORTERS)}")
    targets = split_paths(Path(output))
    if not config.split:
        targets = {"full": targets["full"]}
    for path in targets.values():        # fail before the long export, never half-way
        check_writable(path, config.force)
    built = build_sam(config.model_type, checkpoint=config.checkpoint, seed=config.seed)
    models = {part: export_onnx(built, part, config.exporter, config.multimask) for part in targets}
    for part, model in models.items():
        save_model(model, targets[part], force=config.force)
    return targets


def evaluate(model, *, dataset=None, images=None, annotations=None, **kwargs):
    """COCO segm metrics of an ONNX SAM (full model, or [encoder, decoder]) over a COCO-format set."""
    from .data.coco import load_coco_dataset
    from .eval.runner import evaluate as run_eval

    return run_eval(model, load_coco_dataset(dataset, images, annotations), **kwargs)


def inspect(path: str | Path) -> dict:
    model = load_model(path)
    return summarize(model)


def load(path: str | Path) -> onnx.ModelProto:
    return load_model(path)


def quantize(model_path, output, config=None, **kwargs):
    """Calibrate and write a Q/DQ model (see carsam_onnx.quantize.quantize)."""
    from .config import QuantConfig
    from .quantize import quantize as run_quantize

    return run_quantize(model_path, output, config or QuantConfig(), **kwargs)
