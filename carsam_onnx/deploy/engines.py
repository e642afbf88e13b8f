"""Engines of deploy.SamOnnxPredictor: runtime sessions that take the preprocessed image [1, 3, S, S] and
model-frame prompts (set_image once, then all the image's prompts; SamPredictor's shape). SamOnnxPredictor
(deploy/predictor.py) does the pre- and postprocessing; evaluation runs through it.

Models accepted (recognised by their inputs, see samgraph.inspect_sam_model):
- a full model: image, point_coords, point_labels -> low_res_masks, iou_predictions. It is split
  (samgraph.split_full_model) so the image part runs once per image; if splitting fails, it runs whole once per
  box (slow; a warning says so);
- a pair: an encoder (image -> image_embeddings) and a decoder (image_embeddings, point_coords, point_labels
  -> low_res_masks, iou_predictions), given in either order. The decoder may also be segment-anything's
  SamOnnxModel export (extra inputs mask_input, has_mask_input, orig_im_size: fed "no mask").
A Session's `run_many` gets all prompts of one image at once, so a runtime that can batch them does (the torch
runtime vmaps over them).
"""
from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from ..data.preprocess import Geometry
from ..errors import InputError, ModelError
from ..modelio import load_model
from ..runtime import Runtime, Session
from ..samgraph import (OFFICIAL_EXTRA, SamModelInfo, inspect_sam_model, no_mask_inputs, sam_image_size,
                        split_full_model)


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

    def run_prompts(self, coords: np.ndarray, labels: np.ndarray) -> list[dict[str, np.ndarray]]:
        """The graph's raw outputs per prompt (every mask of a multimask model)."""
        raise NotImplementedError(f"{type(self).__name__} gives only its best mask per prompt")


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
            self._state.update(no_mask_inputs(geo.image_size, geo.original_hw))
        return time.perf_counter() - t0

    def run_prompts(self, coords, labels):
        feeds = [{**self._state, "point_coords": coords[i:i + 1], "point_labels": labels[i:i + 1]}
                 for i in range(len(coords))]
        return self.decoder.run_many(feeds)

    def predict(self, coords, labels):
        return _pick_best(self.run_prompts(coords, labels))


class FullPredictor(BoxPredictor):
    """The whole graph once per box (re-runs the image encoder for every box: slow)."""

    def __init__(self, full: Session, image_size: int, description: str):
        self.full, self.image_size, self.description = full, image_size, description
        self._image = None

    def set_image(self, image, geo):
        self._image = image
        return 0.0

    def run_prompts(self, coords, labels):
        feeds = [{"image": self._image, "point_coords": coords[i:i + 1], "point_labels": labels[i:i + 1]}
                 for i in range(len(coords))]
        return self.full.run_many(feeds)

    def predict(self, coords, labels):
        return _pick_best(self.run_prompts(coords, labels))


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
        size = sam_image_size(info)
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
    size = sam_image_size(enc)
    if dec.image_size is not None and dec.image_size != size:
        raise ModelError(f"{enc.path.name} takes {size} px images but {dec.path.name} expects embeddings "
                         f"of a {dec.image_size} px image")
    return SplitPredictor(runtime.session(enc.path, "encoder"), runtime.session(dec.path, "decoder"), size,
                          f"{enc.path.name} + {dec.path.name}", official=dec_kind == "official_decoder")
