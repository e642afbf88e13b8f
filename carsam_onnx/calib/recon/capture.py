"""What a unit learns from: per calibration image, the quantized model's values at its inputs (every earlier unit
finished: fully quantized, no drop), the float model's inputs and its float outputs (the targets).

    captures = Captures(module, model, with_points, units, config)
    q_in, fp_in, fp_out, where = captures.take(unit, feeds, hooks, unsettled)

The caches stay on the device when they fit (ReconConfig.cache_device_fraction of its free memory) and go to the
host otherwise; a host cache that cannot fit the memory available is refused on its first image
(data/memory.check_cache_fits) instead of growing until the process is killed. Two shortcuts run fewer nodes
for the same values: the image cut (passes/image_cut.py: a full model's prompt-side units start where its
image-only part ends, once every unit inside that part is finished) and the stream cut (frontier.py: a capture
resumes where the previous one stopped).
"""
from __future__ import annotations

import onnx
import torch

from ...config import QuantConfig
from ...data.memory import check_cache_fits
from ...passes.image_cut import image_cut_plan
from ...passes.units import Unit
from ...samgraph import IMAGE_INPUT
from ...torchexec import OnnxModule
from .frontier import Frontier


def tensor_bytes(tensors) -> int:
    """Bytes the tensors hold, each storage once (a value cached twice, as a unit input and in the frontier,
    is one allocation)."""
    seen: dict[int, int] = {}
    for x in tensors:
        st = x.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


STREAM_FACTOR = 2.0   # a GPU's caches go to the host image by image when, measured on the first image, they would
                      # take this many times the share of its free memory they may keep (cache_device_fraction);
                      # nearer the bound they are gathered on the device and moved at the end, as before. With
                      # the default share (0.5) streaming starts where the caches would not fit the free memory
                      # at all, so every capture that could be gathered on the card before still is


def streams_to_host(total: int, free: int, fraction: float) -> bool:
    """Whether a GPU capture of `total` bytes (estimated from its first image) goes to the host image by image:
    far beyond what may stay on the device, it could not even be gathered there first."""
    return total > STREAM_FACTOR * fraction * free


class Captures:
    def __init__(self, module: OnnxModule, model: onnx.ModelProto, with_points: onnx.ModelProto, units: list[Unit],
                 config: QuantConfig):
        """`module` runs `with_points` (`model` with its quantization points); `units`: every unit that may run,
        in graph order (the image cut is planned over them)."""
        self.module, self.config, self.rc = module, config, config.recon
        self.device = torch.device(config.device)
        self.cut_plan = image_cut_plan(model, units) if self.rc.image_cut else None
        self.cut = None    # (quantized, float) values per image at the image cut, once taken
        self.frontier = Frontier(with_points, IMAGE_INPUT) if self.rc.stream_cut else None

    def take(self, unit: Unit, feeds: list[dict], hooks: dict, unsettled: set[str]) -> tuple[list, list, list, torch.device]:
        """Per feed: (quantized-model inputs, float-model inputs, float outputs), and where they are cached.
        `hooks`: the quantized model's replacements now; `unsettled`: the quantizers that may still change (no
        frontier is kept behind them)."""
        from ..baseline import to_torch

        names = list(unit.inputs) + list(unit.extra_inputs)
        targets = [v for v, _ in unit.losses]
        q_in, fp_in, fp_out = [], [], []
        cut = self._image_cut(unit, feeds, hooks)
        front = self.frontier if cut is None else None
        if front is not None and front.serves(names + targets):
            cut = (front.cached[0], front.cached[1])   # resume where the last capture stopped
        keep = front.values(names, unsettled) if front is not None else None
        more = keep or []
        kept_q, kept_fp = [], []
        to_host = False     # a GPU's caches streamed to the host image by image (far too large for the device)
        with torch.no_grad():
            for i, feed in enumerate(feeds):
                t = to_torch(feed, self.config.device)
                if cut is None:
                    fp = self.module.run(t, outputs=names + targets + more)
                    q = self.module.run(t, outputs=names + more, replace=hooks)
                else:
                    t = {k: v for k, v in t.items() if k != IMAGE_INPUT}
                    fp = self.module.run(t, outputs=names + targets + more, start=self._dev(cut[1][i]))
                    q = self.module.run(t, outputs=names + more, replace=hooks, start=self._dev(cut[0][i]))
                if keep:
                    kept_q.append({v: q[v] for v in keep})
                    kept_fp.append({v: fp[v] for v in keep})
                q_in.append([q[n] for n in names])
                fp_in.append([fp[n] for n in unit.inputs])
                fp_out.append([fp[v] for v in targets])
                if i == 0:
                    first = [*q_in[0], *fp_in[0], *fp_out[0], *(v for d in kept_q + kept_fp for v in d.values())]
                    per_image = tensor_bytes(first)
                    if self.device.type == "cuda":
                        free, _ = torch.cuda.mem_get_info(self.device)
                        to_host = streams_to_host(per_image * len(feeds), free, self.rc.cache_device_fraction)
                    if self.device.type == "cpu" or to_host:    # the caches grow on the host: will the rest fit?
                        check_cache_fits(f"reconstruction unit {unit.name}", per_image, len(feeds) - (not to_host),
                                         len(feeds))
                if to_host:
                    q_in[-1], fp_in[-1], fp_out[-1] = ([x.cpu() for x in xs] for xs in (q_in[-1], fp_in[-1], fp_out[-1]))
                    if keep:
                        kept_q[-1], kept_fp[-1] = ({k: v.cpu() for k, v in d.items()} for d in (kept_q[-1], kept_fp[-1]))
        if keep:
            nbytes = sum(x.numel() * x.element_size() for d in kept_q + kept_fp for x in d.values())
            at = torch.device("cpu") if to_host else self._cache_device(nbytes)
            if at != self.device and not to_host:
                check_cache_fits(f"reconstruction unit {unit.name} (frontier)", nbytes // len(feeds), len(feeds), len(feeds))
            front.keep(names, [{k: v.to(at) for k, v in d.items()} for d in kept_q],
                       [{k: v.to(at) for k, v in d.items()} for d in kept_fp])
        nbytes = sum(x.numel() * x.element_size() for lst in (q_in, fp_in, fp_out) for xs in lst for x in xs)
        where = torch.device("cpu") if to_host else self._cache_device(nbytes)
        if where != self.device and not to_host:
            check_cache_fits(f"reconstruction unit {unit.name}", nbytes // len(feeds), len(feeds), len(feeds))
            q_in = [[x.cpu() for x in xs] for xs in q_in]
            fp_in = [[x.cpu() for x in xs] for xs in fp_in]
            fp_out = [[x.cpu() for x in xs] for xs in fp_out]
        return q_in, fp_in, fp_out, where

    def drop_frontier(self) -> None:
        """Forget the stream cut's frontier (values behind it may change: a reopened unit, corrected weights)."""
        if self.frontier is not None:
            self.frontier.drop()

    def _cache_device(self, nbytes: int) -> torch.device:
        if self.device.type != "cuda":
            return self.device
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if nbytes <= self.rc.cache_device_fraction * free else torch.device("cpu")

    def _dev(self, d: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in d.items()}

    def _image_cut(self, unit: Unit, feeds: list[dict], hooks: dict):
        """(quantized, float) per-feed values where the image-only part of a full model (encoder, neck) meets the
        prompt part, once every unit inside the image-only part is finished; None when `unit` is image-only or the
        model has no such split. Prompt-side units then start their captures there instead of at the image."""
        if self.cut_plan is None or unit.name not in self.cut_plan[1]:
            return None
        cut_values, _ = self.cut_plan
        if self.cut is None:
            from ..baseline import to_torch

            qs, fps = [], []
            with torch.no_grad():
                for feed in feeds:
                    t = {IMAGE_INPUT: to_torch(feed, self.config.device)[IMAGE_INPUT]}
                    q = self.module.run(t, outputs=cut_values, replace=hooks)
                    f = self.module.run(t, outputs=cut_values)
                    nbytes = sum(x.numel() * x.element_size() for x in (*q.values(), *f.values())) * len(feeds)
                    where = self._cache_device(nbytes)
                    qs.append({k: v.to(where) for k, v in q.items()})
                    fps.append({k: v.to(where) for k, v in f.items()})
            self.cut = (qs, fps)
        return self.cut
