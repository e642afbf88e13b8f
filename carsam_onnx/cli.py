"""carsam-onnx command line: parse arguments -> config -> api call. No logic here (the user-facing description is
DESCRIPTION)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from . import api
from .calib.registry import method_names, methods_help
from .config import (HELDOUT, INT8_WEIGHT_FORMATS, JCAR_PAIRINGS, MAC_GRANULARITY, MAC_QK_MODES, MAC_ROUNDING,
                     MAC_SCOPES, MAC_WHEN, MAX_REPORT_IMAGES, SMOOTH_ALPHA, SMOOTH_METHODS, BitWidths, CarsamConfig,
                     EvalConfig, ExportConfig, MacConfig, QuantConfig, ReconConfig)
from .command_guard import one_line_warnings, run_guarded
from .runtime import RUNTIMES


def _default(cls, name):
    return next(f.default for f in fields(cls) if f.name == name)


def _add_export(sub):
    p = sub.add_parser("export", help="build SAM with segment-anything and write ONNX (opset 21)")
    p.add_argument("--model-type", required=True, help="vit_b | vit_l | vit_h | reference (the bundled trained model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="official sam_vit_*.pth state dict")
    src.add_argument("--random-init", action="store_true", help="random weights (no checkpoint), seeded by --seed")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (full model)")
    p.add_argument("--split", action="store_true", help="also write OUT.encoder.onnx and OUT.decoder.onnx")
    p.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=_default(ExportConfig, "multimask"),
                   help="3 masks per prompt instead of 1")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default=_default(ExportConfig, "exporter"),
                   help="torch's ONNX exporter (default %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(run=_run_export)


def _print_written(written: dict, quiet: bool) -> int:
    if not quiet:
        for part, path in written.items():
            print(f"wrote {part}: {path}")
    return 0


def _run_export(a) -> int:
    cfg = ExportConfig(model_type=a.model_type, checkpoint=a.checkpoint, seed=a.seed if a.random_init else None,
                       exporter=a.exporter, multimask=a.multimask, split=a.split, force=a.force)
    written = api.export(a.output, cfg, progress=not a.quiet)
    return _print_written(written, a.quiet)


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="describe an ONNX model: I/O, opset, ops, parameters, attention sites")
    p.add_argument("model", help="ONNX model to describe")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(run=_run_inspect)


def _run_inspect(a) -> int:
    from .summary import format_summary

    info = api.inspect(a.model)
    print(json.dumps(info, indent=2) if a.json else format_summary(info))
    return 0


def _smooth_alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give alpha in [0, 1], or auto") from None


def _add_quantize(sub):
    p = sub.add_parser("quantize", help="calibrate and write a Q/DQ ONNX model (opset 21)")
    p.add_argument("model", help="SAM ONNX model (full, encoder or decoder) from `carsam-onnx export`")
    p.add_argument("-o", "--output", required=True, help="the Q/DQ ONNX model to write")
    p.add_argument("--bits", default=str(_default(QuantConfig, "bits")),
                   help="wXaY: X-bit weights, Y-bit activations (2..8; a16 = float activations), e.g. w8a8, w4a4, w4a16")
    p.add_argument("--method", default=_default(QuantConfig, "method"), metavar="{" + ",".join(method_names()) + "}",
                   help=f"calibration method: {methods_help()}")
    p.add_argument("--percentile", type=float, default=_default(QuantConfig, "percentile"),
                   help="clip percentile for --method percentile")
    p.add_argument("--target", choices=["ort", "trt"], default=_default(QuantConfig, "target"),
                   help="ort: asymmetric activations; trt: symmetric, zero point 0, INT8 activation containers")
    p.add_argument("--int8-weights", choices=list(INT8_WEIGHT_FORMATS), default=_default(QuantConfig, "int8_weights"),
                   help="8-bit weights that meet quantized activations: u8 = UINT8 with zero point 128 "
                        "(--target ort only), s7 = INT8 in [-64, 63]: both exact in ONNX Runtime on every x86 CPU; "
                        "s8 = full INT8 (ONNX Runtime saturates it on x86 CPUs without VNNI); auto = u8 for ort, "
                        "s7 for trt")
    p.add_argument("--block-size", type=int, default=_default(QuantConfig, "block_size"),
                   help="blocked weights (INT4) with this many input channels per scale")
    p.add_argument("--device", default=_default(QuantConfig, "device"), help="torch device for calibration (cpu, cuda)")
    p.add_argument("--calib-images", help="folder of calibration images (or a COCO-layout set folder)")
    p.add_argument("--calib-prompts", help="COCO detection-results JSON with boxes for the calibration images")
    p.add_argument("--num-calib", type=int, default=_default(QuantConfig, "num_calib"),
                   help="calibration images (default %(default)s, the published recipe's)")
    p.add_argument("--seed", type=int, default=_default(QuantConfig, "seed"),
                   help="which images and prompts are drawn, and reconstruction's random draws: on the CPU the same seed, "
                        "machine and thread count give the same bytes (default %(default)s)")
    p.add_argument("--keep-float", action="append", metavar="REGEX",
                   help="keep matching layers in float (repeatable; replaces the default list: patch_embed, "
                        "output_upscaling, output_hypernetworks_mlps, iou_prediction_head, prompt_encoder)")
    p.add_argument("--require-attention", action="store_true", help="refuse a model with no attention block")
    sm = p.add_mutually_exclusive_group()
    sm.add_argument("--smooth", type=_smooth_alpha, metavar="ALPHA", default=_default(QuantConfig, "smooth"),
                    help="before calibrating, migrate activation outliers into the weights (SmoothQuant's rule, "
                         "alpha in [0, 1]) wherever a normalisation feeds only quantized weight layers: the image "
                         "encoder's norm1 -> qkv and norm2 -> MLP, the neck's LayerNorm2d -> conv; exact in float "
                         f"(default auto: {SMOOTH_ALPHA:g} for --method {' and '.join(SMOOTH_METHODS)}, off for the "
                         "calibrators)")
    sm.add_argument("--no-smooth", dest="smooth", action="store_const", const=None, help="no scale migration")
    r = p.add_argument_group("block reconstruction (--method recon)")
    r.add_argument("--recon-iters", type=int, default=_default(ReconConfig, "iters"),
                   help=f"steps per unit (default: {_default(ReconConfig, 'cpu_iters')} on a CPU, "
                        f"{_default(ReconConfig, 'cpu_iters_3bit')} there when weights and activations both have "
                        f"<= 3 bits; {_default(ReconConfig, 'gpu_iters')} on a GPU)")
    r.add_argument("--recon-decoder-factor", type=int, default=_default(ReconConfig, "decoder_factor"),
                   help="mask-decoder units take this many times the steps of an encoder unit (default "
                        f"{_default(ReconConfig, 'decoder_factor')})")
    r.add_argument("--recon-batch", type=int, default=_default(ReconConfig, "batch_size"),
                   help=f"calibration images per step (default: {_default(ReconConfig, 'cpu_batch_size')} on a CPU, "
                        f"{_default(ReconConfig, 'gpu_batch_size')} on a GPU, vmapped)")
    r.add_argument("--recon-init", default=_default(ReconConfig, "init_method"),
                   help="calibrator for the weight scales and initial step sizes: minmax | percentile | mse")
    r.add_argument("--recon-drop", type=float, default=_default(ReconConfig, "drop_prob"),
                   help="QDrop: probability that an activation keeps its float value while its unit learns")
    r.add_argument("--recon-cuda-graphs", action=argparse.BooleanOptionalAction,
                   default=_default(ReconConfig, "cuda_graphs"),
                   help="GPU: replay each unit's step as a CUDA graph (a unit that cannot be captured runs eagerly)")
    r.add_argument("--recon-round-lr", type=float, default=_default(ReconConfig, "round_lr"),
                   help=f"Adam learning rate of the AdaRound offsets (default: {_default(ReconConfig, 'cpu_round_lr'):g} "
                        f"on a CPU, {_default(ReconConfig, 'gpu_round_lr'):g} on a GPU)")
    r.add_argument("--recon-scale-lr", type=float, default=_default(ReconConfig, "scale_lr"),
                   help="Adam learning rate (cosine decay to 0) of the LSQ activation step sizes; 0 keeps the "
                        f"calibrator's (default: {_default(ReconConfig, 'cpu_scale_lr'):g} on a CPU, "
                        f"{_default(ReconConfig, 'gpu_scale_lr'):g} on a GPU)")
    r.add_argument("--recon-scale-lr-ref", type=float, default=_default(ReconConfig, "scale_lr_ref"),
                   help="learn each activation step size s0 at scale_lr * s0 / this (relative); default: one "
                        "absolute learning rate for all")
    r.add_argument("--recon-tf32", action=argparse.BooleanOptionalAction, default=_default(ReconConfig, "tf32"),
                   help="GPU: TF32 matmuls and convolutions while reconstructing units (default; "
                        "--no-recon-tf32 for IEEE float32 steps, slower; the emitted model's arithmetic is the same)")
    r.add_argument("--recon-guard", action=argparse.BooleanOptionalAction, default=_default(ReconConfig, "unit_guard"),
                   help="after each unit, keep the calibrator's rounding and step sizes where they reconstruct the "
                        "unit better than what was learned")
    c = p.add_argument_group("CAR-SAM (--method carsam)")
    c.add_argument("--mac", action=argparse.BooleanOptionalAction, default=_default(CarsamConfig, "use_mac"),
                   help="MatMul-aware compensation of the decoder attention projections before reconstruction")
    c.add_argument("--mac-scope", choices=list(MAC_SCOPES), default=_default(MacConfig, "scope"),
                   help="decoder: the two-way decoder's attention sites (the paper's scope); all: the image "
                        "encoder's attention sites too (measured worse on the reference model: docs/results.md)")
    c.add_argument("--mac-lambda", type=float, default=_default(MacConfig, "lam_rel"),
                   help="MAC's ridge strength, relative to the mean eigenvalue of each solve's normal equations "
                        f"(default {_default(MacConfig, 'lam_rel'):g}; larger: smaller corrections)")
    c.add_argument("--mac-qk", choices=list(MAC_QK_MODES), default=_default(MacConfig, "qk"),
                   help="which Q.K^T operand's quantization error MAC moves: k = Q's error into W_K, q = K's into "
                        f"W_Q, qk = both, none (default {_default(MacConfig, 'qk')})")
    c.add_argument("--mac-granularity", choices=list(MAC_GRANULARITY), default=_default(MacConfig, "granularity"),
                   help="head: one Q.K^T correction per head; projection: one per q or k projection, fitted to the "
                        f"heads' summed scores (default {_default(MacConfig, 'granularity')})")
    c.add_argument("--mac-v", action=argparse.BooleanOptionalAction, default=_default(MacConfig, "v"),
                   help="move the softmax output's quantization error into W_V")
    c.add_argument("--mac-when", choices=list(MAC_WHEN), default=_default(MacConfig, "when"),
                   help="start: MAC on the calibrator's model, before reconstruction; decoder: just before the first "
                        "decoder unit, on the model with the encoder's units reconstructed")
    c.add_argument("--mac-rounding", choices=list(MAC_ROUNDING), default=_default(CarsamConfig, "mac_rounding"),
                   help="learn: AdaRound starts from MAC's corrected weights; nearest: every q/k/v projection in "
                        "MAC's scope (corrected or not) keeps nearest rounding (the other weights learn theirs)")
    c.add_argument("--jcar", action=argparse.BooleanOptionalAction, default=_default(CarsamConfig, "use_jcar"),
                   help="joint reconstruction of each two-way layer's token->image and image->token branches")
    c.add_argument("--jcar-pairing", choices=list(JCAR_PAIRINGS), default=_default(CarsamConfig, "pairing"),
                   help="what learns together per decoder layer: attn = the two cross-attentions, mlp = with the "
                        "MLP between them, layer = the whole layer")
    c.add_argument("--jcar-fallback", action=argparse.BooleanOptionalAction,
                   default=_default(CarsamConfig, "joint_fallback"),
                   help="a joint unit that the unit guard rejects (learned worse than the calibrator) is followed by "
                        "its members reconstructed one by one")
    dec = p.add_mutually_exclusive_group()
    dec.add_argument("--encoder", help="encoder ONNX to make calibration embeddings for a decoder-only model")
    dec.add_argument("--embeddings", help=".npz of image embeddings [K,256,H,W] for a decoder-only model")
    p.add_argument("--calib-mask-input", action=argparse.BooleanOptionalAction,
                   default=_default(QuantConfig, "calib_mask_input"),
                   help="segment-anything's own decoder export: calibrate each prompt also as SAM's refinement step "
                        "(mask_input = the FP decoder's low-res logits, has_mask_input 1), not only without a mask")
    p.add_argument("--save-calibration", metavar="FILE",
                   help="also write the calibration result here (for `carsam-onnx emit`)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    _add_provider(p, "for the held-out SQNR check")
    p.add_argument("--report", metavar="DIR", help="write report.md and PNGs (per-layer SQNR, FP vs quantized "
                                                   "mask overlays) into DIR")
    p.add_argument("--report-images", type=int, metavar="N", default=HELDOUT,
                   help=f"held-out prompts the report measures attention, activation SQNR and masks on (default "
                        f"{HELDOUT}, the summary's; more give steadier statistics; at most {MAX_REPORT_IMAGES})")
    p.add_argument("--report-compare", metavar="PATH",
                   help="an earlier report (its folder or recon_units.json) whose reconstruction loss curves the "
                        "report draws beside this run's, e.g. recon (unit by unit) against carsam (JCAR)")
    p.set_defaults(run=_run_quantize)


def _run_quantize(a) -> int:
    keep = tuple(a.keep_float) if a.keep_float else _default(QuantConfig, "keep_float")
    cfg = QuantConfig(bits=BitWidths.parse(a.bits), method=a.method, target=a.target, block_size=a.block_size,
                      percentile=a.percentile, keep_float=keep, num_calib=a.num_calib, seed=a.seed,
                      device=a.device, require_attention=a.require_attention, int8_weights=a.int8_weights,
                      calib_mask_input=a.calib_mask_input, smooth=a.smooth,
                      recon=ReconConfig(iters=a.recon_iters, decoder_factor=a.recon_decoder_factor,
                                        batch_size=a.recon_batch, init_method=a.recon_init,
                                        drop_prob=a.recon_drop, cuda_graphs=a.recon_cuda_graphs,
                                        unit_guard=a.recon_guard, tf32=a.recon_tf32, scale_lr_ref=a.recon_scale_lr_ref,
                                        round_lr=a.recon_round_lr, scale_lr=a.recon_scale_lr),
                      carsam=CarsamConfig(use_mac=a.mac, use_jcar=a.jcar, pairing=a.jcar_pairing,
                                          mac_rounding=a.mac_rounding, joint_fallback=a.jcar_fallback),
                      mac=MacConfig(when=a.mac_when, scope=a.mac_scope, lam_rel=a.mac_lambda, qk=a.mac_qk,
                                    v=a.mac_v, granularity=a.mac_granularity))
    report = api.quantize(a.model, a.output, cfg, calib_images=a.calib_images, calib_prompts=a.calib_prompts,
                          encoder=a.encoder, embeddings=a.embeddings, save_calibration=a.save_calibration,
                          force=a.force, progress=not a.quiet, provider=a.provider, report_dir=a.report,
                          report_compare=a.report_compare, report_images=a.report_images)
    if not a.quiet:
        print("\n".join(report.lines()))
    return 0


def _add_emit(sub):
    p = sub.add_parser("emit", help="write the Q/DQ model from a calibration file (quantize --save-calibration)")
    p.add_argument("model", help="the FP ONNX model the calibration was made on")
    p.add_argument("--calibration", required=True, metavar="FILE", help="file from quantize --save-calibration")
    p.add_argument("-o", "--output", required=True, help="the Q/DQ ONNX model to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(run=_run_emit)


def _run_emit(a) -> int:
    report = api.emit(a.model, a.calibration, a.output, force=a.force)
    if not a.quiet:
        print("\n".join(report.lines()))
    return 0


def _add_threads(p):
    p.add_argument("--threads", type=int, default=_default(EvalConfig, "threads"),
                   help="CPU threads of the runtime (default: its own; ONNX Runtime: one per core); a 4-bit model's "
                        "masks depend on ONNX Runtime's thread count, so fix it to compare machines")


def _add_eval(sub):
    p = sub.add_parser("eval", help="COCO segm mAP / AP50 / AP75 and mIoU of a SAM ONNX model, one box per instance")
    p.add_argument("model", nargs="+", help="a full model, or an encoder and a decoder model")
    p.add_argument("--dataset", help="folder with annotations.json and images/ (as `data synth` writes)")
    p.add_argument("--images", help="image folder of a standard COCO layout (with --annotations)")
    p.add_argument("--annotations", help="instances JSON of a standard COCO layout (e.g. instances_val2017.json)")
    p.add_argument("--prompts", default=_default(EvalConfig, "prompts"),
                   help="gt (ground-truth boxes) or a COCO detection-results JSON")
    p.add_argument("--min-score", type=float, default=_default(EvalConfig, "min_score"),
                   help="drop detector boxes scoring below this")
    p.add_argument("--limit", type=int, default=_default(EvalConfig, "limit"), help="evaluate the first N images only")
    p.add_argument("--runtime", choices=sorted(RUNTIMES), default=_default(EvalConfig, "runtime"),
                   help="ort: ONNX Runtime; torch: the project's torch executor (same Q/DQ semantics), e.g. on a GPU")
    p.add_argument("--device", default=_default(EvalConfig, "device"), help="torch device for --runtime torch (cpu, cuda)")
    _add_provider(p)
    _add_threads(p)
    p.add_argument("--json", dest="json_out", help="write the metrics as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(run=_run_eval)


def _run_eval(a) -> int:
    from .modelio import check_writable

    if a.provider is not None:   # an unavailable provider fails before anything is loaded
        from .runtime.providers import ort_providers

        ort_providers(a.provider)
    cfg = EvalConfig(prompts=a.prompts, min_score=a.min_score, limit=a.limit, runtime=a.runtime, device=a.device,
                     provider=a.provider, threads=a.threads)
    if a.json_out:
        ann = Path(a.dataset) / "annotations.json" if a.dataset else a.annotations
        check_writable(a.json_out, a.force, inputs=[*a.model, ann])
    model = a.model[0] if len(a.model) == 1 else a.model
    result = api.evaluate(model, cfg, dataset=a.dataset, images=a.images, annotations=a.annotations,
                          progress=not a.quiet)
    if a.json_out:
        result.write_json(a.json_out, force=True)
    print(result.summary())
    return 0


def _add_data(sub):
    p = sub.add_parser("data", help="data sets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write a synthetic COCO-format instance-segmentation set")
    s.add_argument("-o", "--output", required=True, help="output folder (annotations.json + images/)")
    s.add_argument("--num-images", type=int, required=True, help="how many images to draw")
    s.add_argument("--seed", type=int, required=True, help="seed of the images and their annotations")
    s.add_argument("--image-size", type=int, help="image side in pixels (default 256)")
    s.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    s.set_defaults(run=_run_synth)


def _run_synth(a) -> int:
    path = api.synth_dataset(a.output, a.num_images, a.seed, image_size=a.image_size, force=a.force)
    if not a.quiet:
        print(f"wrote {a.num_images} images: {path}")
    return 0


def _add_provider(p, what: str = ""):
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime execution provider " + (what + " " if what else "")
                        + "(default cpu; cuda/tensorrt need onnxruntime-gpu)")


class _PromptAction(argparse.Action):
    """--box / --point / --label in command-line order: a --label applies to the --point just before it."""

    def __call__(self, parser, ns, values, option_string=None):
        items = getattr(ns, "prompt_items", None) or []
        if option_string == "--label":
            if not items or items[-1][0] != "point" or items[-1][2] is not None:
                parser.error("--label must follow a --point")
            items[-1] = ("point", items[-1][1], values)
        else:
            items.append(("box" if option_string == "--box" else "point", values, None))
        ns.prompt_items = items


def _add_predict(sub):
    p = sub.add_parser("predict", help="masks for box / point prompts on one image -> mask PNG (+ overlay PNG), "
                                       "or on a folder of images -> a folder of mask PNGs")
    p.add_argument("model", nargs="+", help="a full model, or an encoder and a decoder model (any order; the "
                                             "decoder may be segment-anything's own export)")
    p.add_argument("image", help="image file (RGB or gray), or a folder of images: then -o and --overlay are "
                                 "folders, one PNG per image named after it")
    p.add_argument("--box", nargs=4, type=float, action=_PromptAction, metavar=("X0", "Y0", "X1", "Y1"),
                   help="a box prompt in image pixels (repeatable: one prompt per box)")
    p.add_argument("--point", nargs=2, type=float, action=_PromptAction, metavar=("X", "Y"),
                   help="a point in image pixels (repeatable; all points form one prompt)")
    p.add_argument("--label", type=int, choices=[0, 1], action=_PromptAction,
                   help="label of the --point before it: 1 foreground (default), 0 background")
    p.add_argument("--prompts", metavar="FILE.json", help="with a folder of images: box prompts from a COCO JSON "
                   "(instances file as `data synth` writes, or detection results), one per annotation, instead of "
                   "--box / --point")
    p.add_argument("-o", "--output", required=True, help="mask PNG (255/0; with several prompts: prompt index); "
                                                         "with a folder of images, the output folder")
    p.add_argument("--overlay", help="also write the image with the masks and prompts drawn on it (a folder "
                                     "with a folder of images)")
    p.add_argument("--multimask", action="store_true", help="ask for all masks, keep the best by predicted IoU")
    p.add_argument("--runtime", choices=["ort", "torch"], default="ort",
                   help="ort: ONNX Runtime (default); torch: this project's executor, on --device")
    p.add_argument("--device", help="torch device for --runtime torch (cpu, cuda)")
    _add_provider(p)
    _add_threads(p)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(run=_run_predict, prompt_items=None)


def _run_predict(a) -> int:
    from .errors import InputError

    items = a.prompt_items or []
    if not items and a.prompts is None:
        raise InputError("give at least one --box X0 Y0 X1 Y1 or --point X Y (or, with a folder of images, "
                         "--prompts FILE.json)")
    boxes = [v for kind, v, _ in items if kind == "box"] or None
    points = [v for kind, v, _ in items if kind == "point"] or None
    labels = [1 if lab is None else lab for kind, _, lab in items if kind == "point"] or None
    model = a.model[0] if len(a.model) == 1 else a.model
    out = api.predict(model, a.image, boxes=boxes, points=points, labels=labels, output=a.output,
                      overlay=a.overlay, multimask=a.multimask, runtime=a.runtime, device=a.device,
                      provider=a.provider, force=a.force, prompts_file=a.prompts, progress=not a.quiet,
                      threads=a.threads)
    if hasattr(out, "images"):   # a folder of images
        if not a.quiet:
            print(f"{len(out.images)} images, {out.num_prompts} prompts; wrote masks: {out.mask_dir}"
                  + (f", overlays: {out.overlay_dir}" if out.overlay_dir else "")
                  + (f"; {len(out.skipped)} images without boxes in {a.prompts} skipped" if out.skipped else ""))
        return 0
    if not a.quiet:
        for i, (q, n) in enumerate(zip(out.scores, out.areas)):
            print(f"prompt {i + 1}: predicted IoU {q:.3f}, {n} px")
        print(f"wrote mask: {out.mask_path}" + (f", overlay: {out.overlay_path}" if out.overlay_path else ""))
    return 0


def _add_split(sub):
    p = sub.add_parser("split", help="full model (FP or Q/DQ) -> encoder + decoder cut at the image embedding")
    p.add_argument("model", help="full SAM model, FP or Q/DQ")
    p.add_argument("-o", "--output", help="name stem: writes STEM.encoder.onnx and STEM.decoder.onnx "
                                          "(default: beside MODEL)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(run=_run_split)


def _run_split(a) -> int:
    written = api.split(a.model, a.output, force=a.force)
    return _print_written(written, a.quiet)


def _add_check_trt(sub):
    p = sub.add_parser("check-trt", help="check a Q/DQ model against TensorRT's Q/DQ rules (exit 1 on errors)")
    p.add_argument("model", help="Q/DQ ONNX model to check")
    p.set_defaults(run=_run_check_trt)


def _run_check_trt(a) -> int:
    from .passes.trt_rules import errors

    found = api.check_trt(a.model)
    for v in found:
        print(v)
    bad = errors(found)
    if not a.quiet:
        print(f"{a.model}: {len(bad)} errors, {len(found) - len(bad)} warnings"
              + ("" if bad else " - conforms to TensorRT's documented Q/DQ rules (static check, not a build)"))
    return 1 if bad else 0


def _add_build_engine(sub):
    p = sub.add_parser("build-engine", help="build a TensorRT engine from a Q/DQ model (needs tensorrt)")
    p.add_argument("model", help="Q/DQ ONNX model to build")
    p.add_argument("-o", "--output", required=True, help="serialized engine (.plan)")
    p.add_argument("--fp16", action="store_true", help="weakly typed build with FP16 for the float layers "
                                                        "(default: strongly typed, precisions from the graph)")
    p.add_argument("--workspace", type=float, default=4.0, metavar="GB", help="workspace memory pool (GB)")
    p.add_argument("--force", action="store_true", help="overwrite an existing engine")
    p.set_defaults(run=_run_build_engine)


def _run_build_engine(a) -> int:
    path = api.build_engine(a.model, a.output, fp16=a.fp16, workspace_gb=a.workspace, force=a.force)
    if not a.quiet:
        print(f"wrote engine: {path}")
    return 0


DESCRIPTION = ("Post-training quantization of Segment Anything (SAM) ONNX models to 8 and 4 bits: finds the "
               "attention\nsubgraphs, calibrates on the graph itself (MinMax, Percentile, MSE, block reconstruction, "
               "CAR-SAM)\nand writes a Q/DQ ONNX model for ONNX Runtime and TensorRT.")
EPILOG = """a typical run:
  carsam-onnx export --model-type vit_b --checkpoint sam_vit_b_01ec64.pth -o sam_b.onnx
  carsam-onnx quantize sam_b.onnx -o sam_b_w4a4.onnx --bits w4a4 --method carsam --calib-images DIR --device cuda
  carsam-onnx eval sam_b_w4a4.onnx --images coco/val2017 --annotations instances_val2017.json
  carsam-onnx split sam_b_w4a4.onnx      # -> sam_b_w4a4.encoder.onnx + sam_b_w4a4.decoder.onnx

'carsam-onnx COMMAND --help' gives each command's options; errors are one line with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carsam-onnx", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_export, _add_inspect, _add_quantize, _add_emit, _add_eval, _add_data, _add_predict, _add_split,
                _add_check_trt, _add_build_engine):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    one_line_warnings(args.command, args.quiet)
    return run_guarded(args.command, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
