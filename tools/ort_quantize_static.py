"""Peer baseline: quantize a SAM ONNX model with ONNX Runtime's `quantize_static` (QDQ, per-channel weights).

    python tools/ort_quantize_static.py MODEL.onnx -o OUT.onnx --calibrator minmax|percentile
        [--bits w8a8|w4a4|w4a8|w8a4] [--calib-images DIR] [--calib-prompts FILE] [--num-calib 32] [--seed 0]
        [--percentile 99.99] [--encoder ENC.onnx | --embeddings FILE.npz] [--all-matmuls] [--quantize-outputs]
        [--ort-rewiring] [--json] [--force]

It is set up so that a comparison with `carsam-onnx quantize` differs only in the calibration:
- the same calibration feeds: `carsam_onnx.quantize.calibration_samples` + `carsam_onnx.calib.feeds.build_feeds`
  (the built-in synthetic set, seed 1, when no --calib-images), fed through a CalibrationDataReader;
- the same nodes: `nodes_to_quantize` is our plan's weight layers (MatMul/Gemm/Conv/ConvTranspose with a
  constant weight) plus both attention MatMuls (Q.K^T, softmax.V) of every attention site our matcher finds;
  `nodes_to_exclude` is the plan's kept-float list (patch embedding, prompt encoder, mask upscaling,
  hypernetwork MLPs, IoU head). `--all-matmuls` drops `nodes_to_quantize` and lets ORT take every node of the
  four op types except the excluded ones: it then also quantizes, as activations, both inputs of every other
  MatMul whose two inputs are computed (in SAM the mask head's hyper_in @ upscaled-embedding product);
- the same grids at 8 bits: weights symmetric per output channel, QInt8 with reduce_range (scale absmax / 64,
  values in [-64, 64]; reduce_range_for; ours by default: UINT8 with zero point 128, scale absmax / 127),
  activations per tensor asymmetric (QUInt8 / QUInt4) with 0 in the range (as ours);
- MinMax: ORT's MinMaxCalibrater, global min / max over all calibration runs (no moving average), as ours.
- Percentile: ORT's PercentileCalibrater (2048-bin histogram). ORT's default for it is a symmetric range on
  |x|, which wastes half of an unsigned grid on non-negative tensors (softmax probabilities); we set
  CalibTensorRangeSymmetric False. ORT's asymmetric percentile P cuts (100 - P) / 2 % on each side, ours cuts
  (100 - p) % on each side: `--percentile p` has our meaning and ORT is given P = 2p - 100.
- Outputs: ORT by default also puts a Q/DQ pair on the output of every quantized MatMul/Conv (so the Q.K^T
  logits entering Softmax would be quantized too); we exclude that (OpTypesToExcludeOutputQuantization) so
  only node inputs are quantized, as in ours. `--quantize-outputs` restores ORT's default.
- Float consumers: quantize_static rewires every consumer of a quantized value to its DequantizeLinear output
  (`replace_input_of_all_nodes`), so a float node sharing an input with a quantized layer sees the quantized
  value. In SAM's dynamo export that is 14 nodes of the mask decoder (13 Adds of the TwoWayTransformer: residual
  streams and the point / image positional encodings added to queries and keys, which also feed the q/k/v
  projections; and one Transpose). Ours
  keep such consumers on the float value, so by default the written model gives those inputs their float value
  back (`restore_float_consumers`; the report counts them). `--ort-rewiring` keeps ORT's graph as it is.

What stays different:
- INT4 weights: ORT has no restricted symmetric range for INT4, so it maps [-absmax, absmax] onto [-8, 7] with
  scale absmax / 7.5 and zero point 0: a channel's largest positive weight clips to 7/7.5 of itself. Ours use
  absmax / 7 (the grid of the 8-bit case, as in the papers).
- Conv/Gemm biases would become INT32 with scale = input scale x weight scale (ours stay float); SAM has none
  among the quantized layers (the neck convolutions have no bias, every Gemm is kept float).
- Bit-widths: weights 8 or 4, activations 8 or 4 only (QuantType has no 6-, 3- or 2-bit integer types); other
  widths raise NotExpressible. INT4 needs opset 21 (quantize_static upgrades the model).
Pre-processing (`quant_pre_process`) is not run: it fails on TorchScript-exported SAM graphs; the dynamo exports
need none.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from carsam_onnx.config import DEFAULT_KEEP_FLOAT, BitWidths, QuantConfig  # noqa: E402
from carsam_onnx.errors import CarsamError, InputError, ModelError, OutputError, first_line  # noqa: E402
from carsam_onnx.modelio import EXTERNAL_DATA_THRESHOLD, check_writable, initializer_bytes, load_model  # noqa: E402

CALIBRATORS = ("minmax", "percentile")
OP_TYPES = ("MatMul", "Gemm", "Conv", "ConvTranspose")


class NotExpressible(InputError):
    """The requested bit-width has no QuantType in onnxruntime's quantize_static."""


def quant_types(bits: BitWidths):
    """(activation QuantType, weight QuantType) for `bits`, or NotExpressible."""
    from onnxruntime.quantization import QuantType

    acts = {8: QuantType.QUInt8, 4: getattr(QuantType, "QUInt4", None)}
    weights = {8: QuantType.QInt8, 4: getattr(QuantType, "QInt4", None)}
    a, w = acts.get(bits.activation), weights.get(bits.weight)
    if a is None or w is None:
        raise NotExpressible(f"--bits {bits}: onnxruntime quantize_static has integer types for 8 and 4 bits only "
                             "(QUInt8/QInt8, QUInt4/QInt4), so W{0}A{1} is not expressible".format(
                                 bits.weight, bits.activation))
    return a, w


def expressible(bits: BitWidths) -> bool:
    try:
        quant_types(bits)
    except NotExpressible:
        return False
    return True


class FeedReader:
    """A CalibrationDataReader over a list of feeds (dicts of numpy arrays keyed by graph input names), with the
    set_range / len that quantize_static's CalibStridedMinMax chunking uses."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.start, self.end = 0, len(feeds)
        self._it = iter(self.feeds[self.start:self.end])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds[self.start:self.end])

    def set_range(self, start_index: int, end_index: int):
        self.start, self.end = start_index, end_index
        self.rewind()

    def __len__(self):
        return len(self.feeds)

    def __iter__(self):
        return iter(self.feeds[self.start:self.end])


@dataclass
class OrtStaticReport:
    output: Path
    calibrator: str
    bits: str
    nodes_requested: int               # nodes handed to ORT to quantize (0 with --all-matmuls: all of OP_TYPES)
    nodes_excluded: int                # kept-float nodes excluded
    weights_quantized: int             # DequantizeLinear nodes on initializers
    activations_quantized: int         # QuantizeLinear nodes on computed values
    requested_left_float: list[str]    # requested nodes ORT did not quantize (should be empty)
    float_consumers_of_quantized: int  # float nodes reading a quantized value in the written model
    float_consumers_restored: int      # node inputs ORT had rewired onto a quantized value, given back their float value
    extra_options: dict = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"ORT quantize_static {self.calibrator} {self.bits}: {self.weights_quantized} weights and "
               f"{self.activations_quantized} activations quantized, {self.nodes_excluded} nodes kept float, "
               f"{self.seconds:.1f} s -> {self.output}",
               f"float nodes reading a quantized value: {self.float_consumers_of_quantized} "
               f"({self.float_consumers_restored} inputs ORT had rewired onto a quantized value were given their "
               "float value back)"]
        if self.requested_left_float:
            out.append(f"warning: ORT left {len(self.requested_left_float)} requested nodes float "
                       f"(first: {self.requested_left_float[0]})")
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


def plan_nodes(model: onnx.ModelProto, keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT) -> tuple[list[str], list[str]]:
    """(nodes to quantize, nodes to exclude) from our planner: weight layers + attention MatMuls; kept float."""
    from carsam_onnx.passes.plan import plan_quantization

    plan = plan_quantization(model, QuantConfig(bits=BitWidths(8, 8), keep_float=keep_float))
    nodes = [w.node for w in plan.weights]
    for s in plan.attention:
        nodes.extend([s.qk_matmul, s.av_matmul])
    seen: set[str] = set()
    nodes = [n for n in nodes if not (n in seen or seen.add(n))]
    return nodes, sorted({n for n, _ in plan.kept_float})


def extra_options(calibrator: str, percentile: float, quantize_outputs: bool, stride: int | None) -> dict:
    opts = {
        "ActivationSymmetric": False,
        "WeightSymmetric": True,
        "CalibTensorRangeSymmetric": False,
        "CalibMovingAverage": False,
    }
    if not quantize_outputs:
        opts["OpTypesToExcludeOutputQuantization"] = list(OP_TYPES)
    if calibrator == "percentile":
        opts["CalibPercentile"] = 2 * percentile - 100   # ORT cuts (100 - P) / 2 per side; ours (100 - p) per side
    if stride:
        opts["CalibStridedMinMax"] = stride
    return opts


def _stride(n: int, cap: int = 8) -> int | None:
    """Largest divisor of n that is <= cap (ORT needs n % stride == 0), None when n <= cap."""
    if n <= cap:
        return None
    return max(d for d in range(1, cap + 1) if n % d == 0)


def _quantized_ops(q: onnx.ModelProto) -> set[str]:
    """Names of the MatMul/Gemm/Conv/ConvTranspose nodes reading a DequantizeLinear output on input 0 or 1."""
    dq_out = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in q.graph.node if n.op_type in OP_TYPES and any(i in dq_out for i in n.input[:2] if i)}


def restore_float_consumers(q: onnx.ModelProto) -> int:
    """Give the float nodes that ORT rewired onto a quantized activation their float input back (in place).

    quantize_static feeds every consumer of a quantized value from its DequantizeLinear; our emitter rewires
    only the quantized layers. Returns the number of node inputs changed."""
    inits = {t.name for t in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    source: dict[str, str] = {}
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            p = producers.get(n.input[0])
            if p is not None and p.op_type == "QuantizeLinear" and p.input[0] not in inits:
                source[n.output[0]] = p.input[0]
    quantized = _quantized_ops(q)
    changed = 0
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.name in quantized:
            continue
        for k, name in enumerate(n.input):
            if name in source:
                n.input[k] = source[name]
                changed += 1
    return changed


def inspect_quantized(q: onnx.ModelProto, requested: list[str]) -> tuple[int, int, list[str], int]:
    """(weight DQs, activation Qs, requested nodes left float, float consumers of quantized values)."""
    inits = {t.name for t in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    w_dq = sum(1 for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    a_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    act_dq_out = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits}

    def from_dq(name: str) -> bool:
        p = producers.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    by_name = {n.name: n for n in q.graph.node}
    left = [r for r in requested if r in by_name and not any(from_dq(i) for i in by_name[r].input[:2] if i)]
    quantized_ops = _quantized_ops(q)
    float_consumers = sum(1 for n in q.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                          and n.name not in quantized_ops and any(i in act_dq_out for i in n.input))
    return w_dq, a_q, left, float_consumers


def reduce_range_for(bits: BitWidths) -> bool:
    """quantize_static's reduce_range (INT8 weights in [-64, 64], ONNX Runtime's own remedy) where 8-bit weights
    meet quantized activations: its U8S8 kernels on x86 CPUs without VNNI saturate full 8-bit weights
    (docs/quantization_format.md), and a user's default session would compute something else on such a host.
    Never for INT4 weights (it would halve their grid)."""
    return QuantConfig(bits=bits).int8_format_applies


def ort_quantize_static(model_path: str | Path, output: str | Path, calibrator: str = "minmax",
                        bits: BitWidths = BitWidths(8, 8), *, calib_images: str | Path | None = None,
                        calib_prompts: str | Path | None = None, num_calib: int = 32, seed: int = 0,
                        percentile: float = 99.99, keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT,
                        encoder: str | Path | None = None, embeddings: str | Path | None = None,
                        all_matmuls: bool = False, quantize_outputs: bool = False, ort_rewiring: bool = False,
                        force: bool = False) -> OrtStaticReport:
    """Quantize `model_path` with onnxruntime.quantization.quantize_static on our calibration feeds (module doc)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from carsam_onnx.calib.feeds import build_feeds, image_size
    from carsam_onnx.quantize import calibration_samples

    if calibrator not in CALIBRATORS:
        raise InputError(f"--calibrator {calibrator!r}: choose one of {', '.join(CALIBRATORS)}")
    act_type, weight_type = quant_types(bits)
    ort_rewiring = ort_rewiring or quantize_outputs   # restoring float consumers would undo output Q/DQ
    config = QuantConfig(bits=bits, num_calib=num_calib, seed=seed, percentile=percentile, keep_float=keep_float)
    model_path, output = Path(model_path), Path(output)
    check_writable(output, force)
    model = load_model(model_path)
    nodes, excluded = plan_nodes(model, keep_float)
    if not nodes:
        raise ModelError(f"{model_path}: the planner found no layer to quantize")
    calib, _ = calibration_samples(config, image_size(model), calib_images, calib_prompts)
    feeds = build_feeds(model, calib, encoder, embeddings)
    opts = extra_options(calibrator, percentile, quantize_outputs, _stride(len(feeds)))
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    del model

    t0 = time.perf_counter()
    parent = output.parent if str(output.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=parent) as tmp:
        tmp_out = Path(tmp) / output.name
        logging.getLogger().setLevel(logging.ERROR)   # quantize_static logs a pre-processing hint at WARNING
        try:
            with contextlib.redirect_stdout(io.StringIO()):   # histogram calibrators print on stdout
                quantize_static(str(model_path), str(tmp_out), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(OP_TYPES), per_channel=True,
                                reduce_range=reduce_range_for(bits),
                                activation_type=act_type, weight_type=weight_type,
                                nodes_to_quantize=None if all_matmuls else nodes, nodes_to_exclude=excluded,
                                use_external_data_format=external,
                                calibrate_method=(CalibrationMethod.MinMax if calibrator == "minmax"
                                                  else CalibrationMethod.Percentile),
                                extra_options=opts)
        except (ValueError, RuntimeError, onnx.checker.ValidationError) as e:
            raise ModelError(f"onnxruntime quantize_static failed on {model_path}: {first_line(e)}") from None
        seconds = time.perf_counter() - t0
        qmodel = onnx.load(str(tmp_out), load_external_data=external)
        restored = 0 if ort_rewiring else restore_float_consumers(qmodel)
        if restored:
            if external:
                onnx.save_model(qmodel, str(tmp_out), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=output.name + ".data", size_threshold=1024)
            else:
                onnx.save_model(qmodel, str(tmp_out))
        w_dq, a_q, left, float_consumers = inspect_quantized(qmodel, [] if all_matmuls else nodes)
        del qmodel
        try:
            for p in Path(tmp).iterdir():
                if p.name == output.name or p.name == output.name + ".data":
                    os.replace(p, parent / p.name)
        except OSError as e:
            raise OutputError(f"cannot write {output}: {e.strerror or e}") from None
    return OrtStaticReport(output=output, calibrator=calibrator, bits=str(bits),
                           nodes_requested=0 if all_matmuls else len(nodes), nodes_excluded=len(excluded),
                           weights_quantized=w_dq, activations_quantized=a_q, requested_left_float=left,
                           float_consumers_of_quantized=float_consumers, float_consumers_restored=restored,
                           extra_options=opts, seconds=seconds)


def build_parser() -> argparse.ArgumentParser:
    d = QuantConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="SAM ONNX model (full, encoder or decoder; dynamo export) from `carsam-onnx export`")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calibrator", choices=CALIBRATORS, required=True)
    p.add_argument("--bits", default=str(d.bits), help="w8a8 | w4a4 | w4a8 | w8a4 (what quantize_static can express)")
    p.add_argument("--calib-images", help="folder of calibration images (or a COCO-layout set folder)")
    p.add_argument("--calib-prompts", help="COCO detection-results JSON with boxes for the calibration images")
    p.add_argument("--num-calib", type=int, default=d.num_calib)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--percentile", type=float, default=d.percentile,
                   help="clip (100 - p)%% of values on each side, as `carsam-onnx quantize --percentile`")
    p.add_argument("--keep-float", action="append", metavar="REGEX", help="replace the default keep-float patterns")
    dec = p.add_mutually_exclusive_group()
    dec.add_argument("--encoder", help="encoder ONNX to make calibration embeddings for a decoder-only model")
    dec.add_argument("--embeddings", help=".npz of image embeddings [K,256,H,W] for a decoder-only model")
    p.add_argument("--all-matmuls", action="store_true",
                   help="let ORT quantize every MatMul/Gemm/Conv/ConvTranspose not kept float, not only our plan's nodes")
    p.add_argument("--quantize-outputs", action="store_true",
                   help="ORT's default: also Q/DQ the outputs of those ops (implies --ort-rewiring)")
    p.add_argument("--ort-rewiring", action="store_true",
                   help="keep ORT's rewiring of every consumer of a quantized value (float nodes included)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    return p


def main(argv: list[str] | None = None) -> int:
    import json

    a = build_parser().parse_args(argv)
    try:
        report = ort_quantize_static(
            a.model, a.output, a.calibrator, BitWidths.parse(a.bits), calib_images=a.calib_images,
            calib_prompts=a.calib_prompts, num_calib=a.num_calib, seed=a.seed, percentile=a.percentile,
            keep_float=tuple(a.keep_float) if a.keep_float else DEFAULT_KEEP_FLOAT, encoder=a.encoder,
            embeddings=a.embeddings, all_matmuls=a.all_matmuls, quantize_outputs=a.quantize_outputs,
            ort_rewiring=a.ort_rewiring, force=a.force)
    except CarsamError as e:
        print(f"ort_quantize_static: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json(), indent=2) if a.json else "\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
