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


def export(output: str | Path, config: ExportConfig = ExportConfig(), progress: bool = False) -> dict[str, Path]:
    """Build SAM (checkpoint, random init or bundled reference) and write ONNX; returns part -> path."""
    from .export.models import build_sam
    from .export.onnx_export import EXPORTERS, export_onnx

    if config.exporter not in EXPORTERS:
        raise InputError(f"--exporter {config.exporter!r}: choose one of {', '.join(EXPORTERS)}")
    targets = split_paths(Path(output))
    if not config.split:
        targets = {"full": targets["full"]}
    for path in targets.values():        # fail before the long export, never half-way
        check_writable(path, config.force, inputs=[config.checkpoint])
    from tqdm.auto import tqdm

    written = []
    with tqdm(total=1 + 2 * len(targets), desc="export", unit="step", disable=not progress or None) as bar:
        built = build_sam(config.model_type, checkpoint=config.checkpoint, seed=config.seed)
        bar.update(1)
        models = {}
        for part in targets:
            bar.set_postfix_str(part)
            models[part] = export_onnx(built, part, config.exporter, config.multimask)
            bar.update(1)
        try:
            for part, model in models.items():
                written.append(save_model(model, targets[part], force=config.force))
                bar.update(1)
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
    `overrides` replace fields of `config` (prompts, limit, runtime, device, min_score, threads).
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


# ---- deployment (issue 13) ------------------------------------------------------------------------------------
def predict(model, image, *, boxes=None, points=None, labels=None, output, overlay=None, multimask: bool = False,
            runtime: str = "ort", device=None, provider=None, force: bool = False, prompts_file=None,
            progress: bool = False, threads: int | None = None):
    """Masks for the prompts on one image: writes a mask PNG (and an overlay PNG), returns a PredictOutput. `image`
    a folder: one mask PNG per image into the folder `output` (overlays into the folder `overlay`), the prompts
    the same on every image or from `prompts_file` (COCO JSON), a progress bar unless `progress` is false;
    returns a FolderOutput. `threads`: the runtime's CPU threads (eval's --threads). See deploy/predict_cli.py."""
    from .deploy.predict_cli import predict_to_files

    return predict_to_files(model, image, boxes=boxes, points=points, labels=labels, output=output,
                            overlay=overlay, multimask=multimask, runtime=runtime, device=device,
                            provider=provider, force=force, prompts_file=prompts_file, progress=progress,
                            threads=threads)


def split(model_path, output=None, *, force: bool = False) -> dict[str, Path]:
    """A full SAM graph (FP or Q/DQ) -> encoder + decoder cut at the image embedding; returns part -> path."""
    from .deploy.split_export import split_at_embedding
    from .samgraph import inspect_sam_model, sam_image_size

    model_path = Path(model_path)
    targets = split_paths(Path(output) if output else model_path)
    targets.pop("full")
    for path in targets.values():
        check_writable(path, force, inputs=[model_path])
    model = load_model(model_path)
    encoder, decoder, _ = split_at_embedding(model, sam_image_size(inspect_sam_model(model)))
    save_model(encoder, targets["encoder"], force=force)
    save_model(decoder, targets["decoder"], force=force)
    return targets


def check_trt(model_path):
    """TensorRT Q/DQ rule violations of a model (passes/trt_rules.py)."""
    from .passes.trt_rules import check_trt as run_check

    return run_check(load_model(model_path))


def build_engine(model_path, output, *, fp16: bool = False, workspace_gb: float = 4.0, force: bool = False):
    """A serialized TensorRT engine (deploy/tensorrt.py). Default: a strongly typed network (the Q/DQ graph fixes
    every precision, float layers in FP32), as TensorRT recommends for explicit quantization. fp16: a weakly
    typed network with the FP16 and INT8 builder flags, so TensorRT may run the float layers in FP16 (the Q/DQ
    pairs still fix the quantized layers); TensorRT 10 deprecates weak typing, but it is the only way to get FP16
    float layers from an FP32 Q/DQ graph without rewriting it."""
    from .deploy.tensorrt import build_engine as run_build

    return run_build(model_path, output, strongly_typed=not fp16, fp16=fp16, int8=fp16, workspace_gb=workspace_gb,
                     force=force)
