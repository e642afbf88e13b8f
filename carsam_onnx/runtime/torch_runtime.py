"""`--runtime torch`: the same ONNX graph through the project's torch executor (torchexec/), on the CPU or
a GPU (`--device cuda`). Q/DQ nodes execute with ONNX semantics there, and in IEEE float32 (no TF32: see
torchexec/precision.py), so metrics match ORT's.

On a GPU, all prompts of one image go through the prompt part in one call: SAM graphs are exported for one
prompt (batch 1, constants of batch 1 concatenated with the prompt tokens), so the batch is made with
torch.func.vmap over the per-prompt inputs, each sample seeing batch-1 shapes. The first batched call is
checked against per-prompt runs; a graph where vmap fails or disagrees runs prompt by prompt instead. On the
CPU prompts run one by one (vmap was slower there: vit_b prompt part, 5 prompts, 5.2 s vmapped vs 4.0 s in a
loop for the dynamo export, 8.7 vs 2.8 s for the TorchScript one, on a loaded 2-core machine).

On a GPU each run is also captured as a CUDA graph and replayed (runtime/cuda_graphs.py: the same kernels, so
the same values, without the interpreter's launch overhead). A batch of prompts is padded to the next power of
two (repeating its last prompt; the extra outputs are dropped), so a few captured batch sizes serve every image.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import first_line
from ..modelio import load_model
from ..torchexec.device import torch_device
from ..torchexec.precision import ieee_fp32
from .base import Runtime, Session

MAX_VMAP_BATCH = 64          # prompts per vmapped call (bounds activation memory)
VMAP_CHECK_RTOL = 1e-3       # batched vs per-prompt outputs on the first call, relative to the output's scale


class TorchSession(Session):
    def __init__(self, model: onnx.ModelProto, device: torch.device, batch_prompts: bool | None = None,
                 cuda_graphs: bool | None = None):
        from ..torchexec import OnnxModule

        self.device = device
        self.module = OnnxModule(model).to(device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.input_names = tuple(self.module.input_names)
        self.output_names = tuple(self.module.output_names)
        if batch_prompts is None:
            batch_prompts = device.type != "cpu"
        self._vmap_ok: bool | None = None if batch_prompts else False  # None: not tried yet
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        self._graphs = None
        if cuda_graphs and device.type == "cuda":
            from .cuda_graphs import CudaGraphRuns
            self._graphs = CudaGraphRuns()

    def _call(self, key: str, run, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return run(inputs) if self._graphs is None else self._graphs(key, run, inputs)

    def _tensors(self, feeds) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()
                if k in self.input_names}

    @staticmethod
    def _numpy(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
                for k, v in out.items()}

    def run(self, feeds):
        with torch.no_grad(), ieee_fp32():
            return self._numpy(self._call("run", self.module.run, self._tensors(feeds)))

    def run_many(self, feeds):
        if len(feeds) < 2 or self._vmap_ok is False:
            return [self.run(f) for f in feeds]
        shared = {k for k in feeds[0] if k in self.input_names and all(f.get(k) is feeds[0][k] for f in feeds)}
        varying = [k for k in feeds[0] if k in self.input_names and k not in shared]
        if not varying or any(f[k].shape != feeds[0][k].shape for f in feeds for k in varying):
            return [self.run(f) for f in feeds]
        if self._vmap_ok is None:
            return self._first_batched(feeds, shared, varying)
        out = []
        for start in range(0, len(feeds), MAX_VMAP_BATCH):
            out.extend(self._vmapped(feeds[start:start + MAX_VMAP_BATCH], shared, varying))
        return out

    def _vmapped(self, feeds, shared, varying) -> list[dict[str, np.ndarray]]:
        if any(np.asarray(f[k]).shape[0] != 1 for f in feeds for k in varying):
            raise ValueError("per-prompt inputs must have batch 1")
        n = len(feeds)
        if self._graphs is not None:   # pad to a power of two: few batch sizes to capture
            feeds = feeds + [feeds[-1]] * ((1 << (n - 1).bit_length()) - n)
        given = self._tensors({k: feeds[0][k] for k in shared})
        given.update({"\0" + k: torch.as_tensor(np.stack([np.asarray(f[k])[0] for f in feeds])).to(self.device)
                      for k in varying})

        def batched(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            fixed = {k: v for k, v in inputs.items() if not k.startswith("\0")}
            stacked = {k[1:]: v for k, v in inputs.items() if k.startswith("\0")}
            return torch.func.vmap(lambda per: self.module.run({**fixed, **{k: v[None] for k, v in per.items()}}))(
                stacked)

        with torch.no_grad(), ieee_fp32():
            out = self._numpy(self._call("vmap", batched, given))
        return [{k: v[i] for k, v in out.items()} for i in range(n)]

    def _first_batched(self, feeds, shared, varying):
        single = [self.run(f) for f in feeds[:2]]
        try:
            batched = self._vmapped(feeds[:2], shared, varying)
            ok = all(np.allclose(b[k], s[k], rtol=0, atol=VMAP_CHECK_RTOL * max(1.0, float(np.abs(s[k]).max())))
                     and b[k].shape == s[k].shape for b, s in zip(batched, single) for k in s)
        except Exception as e:  # an op without a batching rule, a shape the graph cannot take...
            warnings.warn(f"torch runtime: prompts run one by one (batching them failed: {type(e).__name__}: "
                          f"{first_line(e, 120)})", stacklevel=3)
            ok = False
        self._vmap_ok = bool(ok)
        return single + self.run_many(feeds[2:]) if len(feeds) > 2 else single


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, device: str | None = None, batch_prompts: bool | None = None, cuda_graphs: bool | None = None,
                 threads: int | None = None):
        """batch_prompts: vmap an image's prompts through the prompt part; cuda_graphs: capture and replay each
        run (None: both on GPUs, neither on the CPU); threads: torch's CPU threads for this process (None: as
        they are)."""
        self.device = torch_device(device, hint="use --device cpu or --runtime ort")
        self.batch_prompts = batch_prompts
        self.cuda_graphs = cuda_graphs
        self.threads = threads
        if threads is not None:
            torch.set_num_threads(threads)

    def session(self, model, what):
        if isinstance(model, (str, Path)):
            model = load_model(model)
        return TorchSession(model, self.device, self.batch_prompts, self.cuda_graphs)
