"""Captured runs for the torch runtime on a GPU: each distinct input signature of a session is run eagerly
twice, captured once as a CUDA graph and replayed from then on.

The torch executor interprets the ONNX graph node by node in Python; on a GPU that launches thousands of small
kernels per image (a Q/DQ graph adds five or six elementwise kernels per quantized activation), so the GPU waits
on Python. A replay launches the recorded kernels at once. It computes exactly what the eager run computes: the
same kernels on the same inputs (the first replay is compared with the eager run; a signature whose replay
differs, or whose capture is refused, runs eagerly from then on, with a warning).

A signature is the names, shapes and dtypes of the tensors given. Replays share one memory pool: a replay's
outputs are valid until the next replay of any signature, so callers copy them out first (TorchSession does).
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch

from ..errors import first_line

Run = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
WARMUP_RUNS = 2      # eager runs before capture: the executor's plan for the shapes settles (static values)
MAX_SIGNATURES = 16  # captured signatures kept per session (each holds its static inputs)


def _signature(inputs: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


class _Captured:
    def __init__(self, run: Run, inputs: Mapping[str, torch.Tensor], pool):
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        side = torch.cuda.Stream(device=next(iter(inputs.values())).device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                eager = run(self.inputs)
            eager = {k: v.clone() for k, v in eager.items()}
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = run(self.inputs)
        self.graph.replay()
        if not _same(self.outputs, eager):
            raise RuntimeError("the replay differs from the eager run")

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for k, v in inputs.items():
            self.inputs[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.outputs


class CudaGraphRuns:
    """`runs(key, run, inputs)`: run(inputs) through a captured graph for (key, signature of inputs)."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[tuple, _Captured] = {}
        self.refused: dict[tuple, str] = {}

    def __call__(self, key: str, run: Run, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sig = (key, _signature(inputs))
        graph = self.captured.get(sig)
        if graph is None:
            if sig in self.refused or len(self.captured) >= MAX_SIGNATURES:
                return run(inputs)
            try:
                graph = _Captured(run, inputs, self.pool)
            except Exception as e:   # a host synchronisation inside, an op graphs refuse, a differing replay
                torch.cuda.synchronize()
                self.refused[sig] = f"{type(e).__name__}: {first_line(e, 160)}"
                warnings.warn(f"torch runtime: {key} runs eagerly (CUDA graph capture refused: {self.refused[sig]})",
                              stacklevel=3)
                return run(inputs)
            self.captured[sig] = graph
        return graph(inputs)
