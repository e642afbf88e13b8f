"""Run an ONNX SAM model (FP or Q/DQ) over a COCO-format set with one box prompt per instance and score it.

Models accepted (recognised by their inputs, see `inspect_sam_model`):
- a full model: image, point_coords, point_labels -> low_res_masks, iou_predictions. It is split
  (eval/split.py) so the image part runs once per image; if splitting fails, it runs whole once per box
  (slow; a warning says so);
- a pair: an encoder (image -> image_embeddings) and a decoder (image_embeddings, point_coords, point_labels
  -> low_res_masks, iou_predictions), given in either order. The decoder may also be segment-anything's
  SamOnnxModel export (extra inputs mask_input, has_mask_input, orig_im_size: fed "no mask").

Execution goes through a `Runtime`: it turns an ONNX model into a `Session` (named numpy in, named numpy out).
Built in: "ort" (ONNX Runtime) and "torch" (the project's torch executor, eval/torch_runtime.py, on
--device cpu or cuda); `register_runtime` adds others. A Session's `run_many` gets all prompts of one image
at once, so a runtime that can batch them does (the torch runtime vmaps over them).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from ..data.coco import CocoDataset, load_coco_dataset
from ..data.preprocess import Geometry, postprocess_masks, preprocess_image
from ..data.prompts import BoxPrompt, box_inputs, gt_box_prompts, load_detection_prompts
from ..errors import InputError, ModelError, OutputError
from ..modelio import EXTERNAL_DATA_THRESHOLD, first_line, initializer_bytes, load_model
from .metrics import Prediction, encode_masks, segm_metrics
from .split import split_full_model

META_IMAGE_SIZE = "carsam.image_size"
OFFICIAL_EXTRA = ("mask_input", "has_mask_input", "orig_im_size")


# ---- runtimes -------------------------------------------------------------------------------------------------
class Session(ABC):
    """One loaded model: named numpy arrays in, named numpy arrays out."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...

    def run_many(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Several independent runs (all prompts of one image). Override to batch them."""
        return [self.run(f) for f in feeds]


class Runtime(ABC):
    name: str

    @abstractmethod
    def session(self, model: onnx.ModelProto | Path, what: str) -> Session:
        """Load `model` (a ModelProto, or a path to load from, external data included)."""


class OrtSession(Session):
    def __init__(self, sess):
        self._sess = sess
        self.input_names = tuple(i.name for i in sess.get_inputs())
        self.output_names = tuple(o.name for o in sess.get_outputs())

    def run(self, feeds):
        outs = self._sess.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
        return dict(zip(self.output_names, outs))


class OrtRuntime(Runtime):
    """ONNX Runtime on the CPU (or `providers`), at full graph optimisation with two changes so that a Q/DQ
    model computes what its graph says:
    - INT4 weight DQ + MatMul fused into MatMulNBits computes at accuracy level 0 (float weights); at ORT's
      default level the error reaches ~1e-1 (FACTS.md);
    - the WeightBiasQuantization optimizer is off: after MatMul + Add -> Gemm fusion it rounds a float bias to
      int32 at scale (input scale x weight scale), which at 4-bit activations moved the tiny SAM's mask logits
      by ~10% of their range (tests/eval/test_ort_runtime.py, test_runtime_parity_qdq.py).
    """

    name = "ort"
    DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)

    def __init__(self, providers: Sequence[str] | None = None, threads: int | None = None):
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.threads = threads

    def session(self, model, what):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = False   # the arena grew ~3 GB per vit_b encoder run; plain allocations stay flat
        if self.threads:
            so.intra_op_num_threads = self.threads
        if isinstance(model, (str, Path)):
            return OrtSession(self._create(ort, str(model), so, what))
        if initializer_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
            return OrtSession(self._create(ort, model.SerializeToString(), so, what))
        # a protobuf cannot serialise past 2 GB: hand ORT a temporary file with external data
        with tempfile.TemporaryDirectory(prefix="carsam-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            return OrtSession(self._create(ort, str(path), so, what))

    def _create(self, ort, src, so, what):
        try:
            return ort.InferenceSession(src, so, providers=self.providers,
                                        disabled_optimizers=list(self.DISABLED_OPTIMIZERS))
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load the {what}: {first_line(e)}") from None


def _ort_runtime(device: str | None = None) -> Runtime:
    if device and device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(f"--device {device} with --runtime ort needs onnxruntime-gpu; "
                             "or use --runtime torch --device cuda")
        return OrtRuntime(["CUDAExecutionProvider", "CPUExecutionProvider"])
    if device not in (None, "cpu"):
        raise InputError(f"--device {device}: --runtime ort takes cpu or cuda")
    return OrtRuntime()


def _torch_runtime(device: str | None = None) -> Runtime:
    from .torch_runtime import TorchRuntime  # imports the torch executor only when asked for

    return TorchRuntime(device)


RUNTIMES: dict[str, Callable[..., Runtime]] = {"ort": _ort_runtime, "torch": _torch_runtime}


def register_runtime(name: str, factory: Callable[..., Runtime]) -> None:
    """Make `--runtime NAME` available; factory(device=...) -> Runtime."""
    RUNTIMES[name] = factory


def get_runtime(runtime: str | Runtime, device: str | None = None) -> Runtime:
    if isinstance(runtime, Runtime):
        return runtime
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime!r} is not available; choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime](device=device)


# ---- what kind of SAM graph is this? ----------------------------------------------------------------------
@dataclass(frozen=True)
class SamModelInfo:
    kind: str                  # full | encoder | decoder | official_decoder
    image_size: int | None     # S; None when the graph does not tell (decoder without metadata)
    path: Path | None


def _dims(v: onnx.ValueInfoProto) -> list:
    t = v.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim] \
        if t.HasField("shape") else None


def _check_rank(v, rank: int, last: int | None, path) -> list:
    dims = _dims(v)
    if dims is not None and (len(dims) != rank or (last is not None and dims[-1] not in (last, None))
                             or (isinstance(dims[-1], str) and last is not None)):
        raise ModelError(f"{path}: input {v.name} has shape {dims}; a SAM graph expects rank {rank}"
                         + (f" with last dimension {last}" if last else ""))
    return dims or []


def inspect_sam_model(model: onnx.ModelProto, path: Path | None = None) -> SamModelInfo:
    """Recognise a SAM graph by its inputs; ModelError (one line) for anything else."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = {i.name: i for i in g.input if i.name not in inits}
    outputs = {o.name for o in g.output}
    names = set(inputs)
    where = path or "model"
    meta = {p.key: p.value for p in model.metadata_props}
    size = int(meta[META_IMAGE_SIZE]) if meta.get(META_IMAGE_SIZE, "").isdigit() else None
    if names == {"image"}:
        kind = "encoder"
    elif names == {"image", "point_coords", "point_labels"}:
        kind = "full"
    elif names == {"image_embeddings", "point_coords", "point_labels"}:
        kind = "decoder"
    elif names == {"image_embeddings", "point_coords", "point_labels", *OFFICIAL_EXTRA}:
        kind = "official_decoder"
    else:
        raise ModelError(f"{where} is not a SAM graph: inputs {sorted(names)}; expected image, point_coords, "
                         "point_labels (full), image (encoder) or image_embeddings, point_coords, point_labels (decoder)")
    if "image" in inputs:
        d = _check_rank(inputs["image"], 4, None, where)
        if len(d) == 4 and d[1] not in (3, None):
            raise ModelError(f"{where}: input image has {d[1]} channels; SAM takes 3")
        if len(d) == 4 and isinstance(d[2], int) and d[2] == d[3] and d[2] > 0:
            size = d[2]
    if "image_embeddings" in inputs:
        d = _check_rank(inputs["image_embeddings"], 4, None, where)
        if size is None and len(d) == 4 and isinstance(d[2], int) and d[2] > 0:
            size = d[2] * 16
    if "point_coords" in inputs:
        _check_rank(inputs["point_coords"], 3, 2, where)
        _check_rank(inputs["point_labels"], 2, None, where)
        need = {"low_res_masks", "iou_predictions"}
        if not need <= outputs:
            raise ModelError(f"{where}: outputs {sorted(outputs)} lack {', '.join(sorted(need - outputs))}; "
                             "export with carsam-onnx export")
    elif len(g.output) != 1:
        raise ModelError(f"{where}: an image encoder must have one output (the image embedding), found {len(g.output)}")
    return SamModelInfo(kind, size, path)


# ---- box predictors over sessions ------------------------------------------------------------------------------
class BoxPredictor(ABC):
    """set_image once, then predict for all the image's boxes (SamPredictor's shape)."""

    image_size: int
    description: str

    @abstractmethod
    def set_image(self, image: np.ndarray, geo: Geometry) -> float:
        """Store/encode the preprocessed image [1, 3, S, S]; returns seconds spent."""

    @abstractmethod
    def predict(self, coords: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k prompts (coords [k, n, 2], labels [k, n]) -> (low-res logits [k, S/4, S/4], predicted IoU [k]);
        with several masks per prompt, the one with the highest predicted IoU."""


def _pick_best(outs: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    masks, ious = [], []
    for o in outs:
        m, q = np.asarray(o["low_res_masks"]), np.asarray(o["iou_predictions"]).reshape(-1)
        m = m.reshape(-1, *m.shape[-2:])
        j = int(np.argmax(q)) if q.size > 1 else 0
        masks.append(m[j])
        ious.append(float(q[j]))
    return np.stack(masks).astype(np.float32), np.asarray(ious, dtype=np.float32)


class SplitPredictor(BoxPredictor):
    """Image part once per image, prompt part per box. The image part's outputs feed the prompt part by name
    (a single encoder output feeds the decoder's image_embeddings whatever its name)."""

    def __init__(self, encoder: Session, decoder: Session, image_size: int, description: str,
                 official: bool = False):
        self.encoder, self.decoder, self.image_size = encoder, decoder, image_size
        self.description, self.official = description, official
        self._state: dict[str, np.ndarray] = {}
        missing = [n for n in decoder.input_names if n not in encoder.output_names
                   and n not in ("point_coords", "point_labels", *OFFICIAL_EXTRA)]
        if missing and not (len(encoder.output_names) == 1 and missing == ["image_embeddings"]):
            raise ModelError(f"the decoder needs {', '.join(missing)}, which the encoder does not produce")
        self._rename = {encoder.output_names[0]: "image_embeddings"} if missing else {}

    def set_image(self, image, geo):
        t0 = time.perf_counter()
        out = self.encoder.run({"image": image})
        self._state = {self._rename.get(k, k): v for k, v in out.items()}
        if self.official:
            s = geo.image_size // 4
            self._state.update(mask_input=np.zeros((1, 1, s, s), np.float32),
                               has_mask_input=np.zeros((1,), np.float32),
                               orig_im_size=np.asarray(geo.original_hw, np.float32))
        return time.perf_counter() - t0

    def predict(self, coords, labels):
        feeds = [{**self._state, "point_coords": coords[i:i + 1], "point_labels": labels[i:i + 1]}
                 for i in range(len(coords))]
        return _pick_best(self.decoder.run_many(feeds))


class FullPredictor(BoxPredictor):
    """The whole graph once per box (re-runs the image encoder for every box: slow)."""

    def __init__(self, full: Session, image_size: int, description: str):
        self.full, self.image_size, self.description = full, image_size, description
        self._image = None

    def set_image(self, image, geo):
        self._image = image
        return 0.0

    def predict(self, coords, labels):
        feeds = [{"image": self._image, "point_coords": coords[i:i + 1], "point_labels": labels[i:i + 1]}
                 for i in range(len(coords))]
        return _pick_best(self.full.run_many(feeds))


def _load(path: Path) -> tuple[onnx.ModelProto, SamModelInfo]:
    model = load_model(path, load_external_data=False)
    return model, inspect_sam_model(model, path)


def build_predictor(model: str | Path | Sequence[str | Path], runtime: Runtime) -> BoxPredictor:
    """A BoxPredictor for a full model, or an (encoder, decoder) pair in either order."""
    paths = [Path(model)] if isinstance(model, (str, Path)) else [Path(p) for p in model]
    if len(paths) == 1:
        proto, info = _load(paths[0])
        if info.kind != "full":
            other = "decoder" if info.kind == "encoder" else "image encoder"
            raise ModelError(f"{paths[0]} is a SAM {info.kind.replace('_', ' ')}; give its {other} as well, "
                             "or a full model")
        size = _need_size(info)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            proto = load_model(paths[0], load_external_data=True)
        try:
            enc, dec, boundary = split_full_model(proto)
        except ModelError as e:
            warnings.warn(f"running the full model once per box ({e})", stacklevel=2)
            return FullPredictor(runtime.session(paths[0], "full model"), size, f"{paths[0].name} (per box)")
        del proto
        desc = f"{paths[0].name} (split at {len(boundary)} values)"
        return SplitPredictor(runtime.session(enc, "image part"), runtime.session(dec, "prompt part"), size, desc)
    if len(paths) != 2:
        raise InputError(f"give one full model or an encoder and a decoder, not {len(paths)} models")
    (_, a), (_, b) = _load(paths[0]), _load(paths[1])
    pair = {a.kind: a, b.kind: b}
    dec_kind = "decoder" if "decoder" in pair else "official_decoder"
    if "encoder" not in pair or dec_kind not in pair:
        raise ModelError(f"{paths[0].name} and {paths[1].name} are a SAM {a.kind} and {b.kind}; a pair must be "
                         "an image encoder and a decoder")
    enc, dec = pair["encoder"], pair[dec_kind]
    size = _need_size(enc)
    if dec.image_size is not None and dec.image_size != size:
        raise ModelError(f"{enc.path.name} takes {size} px images but {dec.path.name} expects embeddings "
                         f"of a {dec.image_size} px image")
    return SplitPredictor(runtime.session(enc.path, "encoder"), runtime.session(dec.path, "decoder"), size,
                          f"{enc.path.name} + {dec.path.name}", official=dec_kind == "official_decoder")


def _need_size(info: SamModelInfo) -> int:
    if info.image_size is None:
        raise ModelError(f"{info.path}: cannot tell the input image size (no static image shape and no "
                         f"{META_IMAGE_SIZE} metadata)")
    return info.image_size


# ---- evaluation -----------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    segm_mAP: float
    AP50: float
    AP75: float
    mIoU: float
    num_instances: int
    num_images: int
    prompts: str
    model: str
    runtime: str
    image_size: int
    timings: dict = field(default_factory=dict)      # medians and totals, seconds
    per_image: list = field(default_factory=list)    # {image_id, num_prompts, encoder_s, decoder_s, post_s}

    def to_json(self) -> dict:
        return asdict(self)

    def write_json(self, path: str | Path, force: bool = True) -> Path:
        """Atomic write (temporary file in the target folder, then rename)."""
        path = Path(path)
        if path.exists() and not force:
            raise OutputError(f"{path} exists; pass --force to overwrite it")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"cannot write {path}: folder {parent} does not exist")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=2)
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    def summary(self) -> str:
        return (f"segm mAP {self.segm_mAP:.2f}  AP50 {self.AP50:.2f}  AP75 {self.AP75:.2f}  mIoU {self.mIoU:.4f}  "
                f"({self.num_instances} instances, {self.num_images} images, {self.prompts} boxes)")


def select_prompts(dataset: CocoDataset, prompts: str | Path, limit: int | None,
                   min_score: float = 0.0) -> tuple[dict[int, list[BoxPrompt]], list[int], str]:
    """(prompts by image, evaluated image ids, label). Ground truth: the first `limit` images (by id) that have
    instances. Detector boxes: the first `limit` images of the set, with or without boxes (images the detector
    missed still count against recall)."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: must be >= 1")
    if str(prompts) == "gt":
        by_image = gt_box_prompts(dataset)
        ids = [i for i in dataset.image_ids if i in by_image][:limit]
        if not ids:
            raise InputError(f"{dataset.annotations_path.name} has no non-crowd instances to prompt")
        label = "gt"
    else:
        by_image = load_detection_prompts(prompts, dataset, min_score)
        ids = dataset.image_ids[:limit]
        label = Path(prompts).name
    return {i: by_image[i] for i in ids if i in by_image}, ids, label


def run_predictions(predictor: BoxPredictor, dataset: CocoDataset, by_image: dict[int, list[BoxPrompt]],
                    progress: bool = True) -> tuple[list[Prediction], list[dict]]:
    """Masks for every prompt: encoder once per image, all its boxes through the decoder."""
    from tqdm.auto import tqdm

    preds: list[Prediction] = []
    per_image: list[dict] = []
    ids = sorted(by_image)
    dataset.check_image_files(ids)
    bar = tqdm(ids, desc="eval", unit="img", disable=None if progress else True, leave=False)
    for image_id in bar:
        prompts = by_image[image_id]
        image, geo = preprocess_image(dataset.read_image(image_id), predictor.image_size)
        enc_s = predictor.set_image(image, geo)
        coords, labels = box_inputs(np.array([p.box_xyxy for p in prompts]), geo)
        t0 = time.perf_counter()
        low_res, iou = predictor.predict(coords, labels)
        dec_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rles = []
        for start in range(0, len(prompts), 16):  # bounded memory: 16 full-size masks at a time
            rles.extend(encode_masks(postprocess_masks(low_res[start:start + 16], geo)))
        post_s = time.perf_counter() - t0
        for p, rle, q in zip(prompts, rles, iou):
            score = p.score if p.score is not None else float(q)
            preds.append(Prediction(image_id, p.category_id, rle, score, p.ann_id))
        per_image.append({"image_id": image_id, "num_prompts": len(prompts), "encoder_s": round(enc_s, 4),
                          "decoder_s": round(dec_s, 4), "post_s": round(post_s, 4)})
    return preds, per_image


def _timings(per_image: list[dict], total_s: float) -> dict:
    if not per_image:
        return {"total_s": round(total_s, 3)}
    n = sum(r["num_prompts"] for r in per_image)
    return {"total_s": round(total_s, 3),
            "encoder_s_median": round(statistics.median(r["encoder_s"] for r in per_image), 4),
            "decoder_s_per_prompt": round(sum(r["decoder_s"] for r in per_image) / max(n, 1), 4),
            "postprocess_s_per_prompt": round(sum(r["post_s"] for r in per_image) / max(n, 1), 4)}


def evaluate(model: str | Path | Sequence[str | Path], dataset: CocoDataset | str | Path, prompts: str | Path = "gt",
             limit: int | None = None, runtime: str | Runtime = "ort", device: str | None = None,
             progress: bool = True, min_score: float = 0.0) -> EvalResult:
    """COCO segm mAP / AP50 / AP75 and mIoU of a SAM ONNX model with one box prompt per instance.

    `prompts`: "gt" (ground-truth boxes; mask score = predicted IoU) or a COCO detection-results JSON (mask
    score = detector score). `model`: a full model or an (encoder, decoder) pair. `dataset`: a CocoDataset or a
    dataset folder (annotations.json + images/).
    """
    t_start = time.perf_counter()
    if not isinstance(dataset, CocoDataset):
        dataset = load_coco_dataset(dataset)
    by_image, ids, label = select_prompts(dataset, prompts, limit, min_score)
    rt = get_runtime(runtime, device)
    predictor = build_predictor(model, rt)
    preds, per_image = run_predictions(predictor, dataset, by_image, progress)
    metrics = segm_metrics(dataset, preds, ids)
    return EvalResult(metrics["segm_mAP"], metrics["AP50"], metrics["AP75"], metrics["mIoU"], len(preds), len(ids),
                      label, predictor.description, getattr(rt, "name", type(rt).__name__), predictor.image_size,
                      _timings(per_image, time.perf_counter() - t_start), per_image)
