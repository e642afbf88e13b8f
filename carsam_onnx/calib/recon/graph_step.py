"""One reconstruction step of a unit as a replayable CUDA graph (GPU only).

On a GPU the eager step is bound by Python: the ONNX interpreter under vmap, LSQ fake quantization and AdaRound
launch hundreds of small kernels per step while the GPU waits (docs/results.md). Within one unit nothing that
the Python side decides changes between steps except three values: which cached images the step draws, the
rounding regulariser's exponent, and whether the regulariser is on (the warm-up). All three live in device
buffers here, so the step — gather the images from the stacked caches, QDrop-mix the unit's inputs, run the
unit vmapped over the batch, the loss, the regulariser, the backward pass — is captured once per unit and
replayed. Adam's update stays eager (a few foreach kernels) on the gradients the replay writes in place.

The step computes what the eager step computes (loop.Reconstructor.reconstruct): the same loss, the same
gradients (the regulariser's term is multiplied by 0 during the warm-up instead of skipped), a different draw
of the QDrop masks. A unit whose step cannot be captured (a host synchronisation inside, an op that graphs
refuse) runs eagerly; the reason is kept in its UnitStats.
"""
from __future__ import annotations

import torch

WARMUP_RUNS = 2   # eager runs on a side stream before capture (allocator and executor plans settle)


def image_loss(outs, targets, axes) -> torch.Tensor:
    """A unit's reconstruction loss on one image: per target, the squared error summed over its channel axis
    `ax`, averaged over the rest; summed over targets."""
    return sum((out - t).pow(2).sum(dim=ax).mean() for out, t, ax in zip(outs, targets, axes))


def batch_loss(outs, targets, axes) -> torch.Tensor:
    """The same on a vmapped batch: the per-image channel axes shifted by the batch dimension."""
    return image_loss(outs, targets, [ax if ax < 0 else ax + 1 for ax in axes])


class GraphStep:
    def __init__(self, run_vmapped, names: list[str], n_main: int, q_in: list, fp_in: list, fp_out: list,
                 axes: list[int], rounding: list, round_weight: float, drop_prob: float, batch: int, device):
        self.run_vmapped, self.names, self.n_main = run_vmapped, names, n_main
        self.axes, self.rounding, self.round_weight, self.drop_prob = axes, rounding, round_weight, drop_prob
        # Stacked caches [N, ...] on the device: the step gathers its images by index inside the graph.
        self.q = [torch.stack([xs[j] for xs in q_in]).to(device) for j in range(n_main)]
        self.fp = [torch.stack([xs[j] for xs in fp_in]).to(device) for j in range(len(fp_in[0]))]  # the mixed inputs
        self.tg = [torch.stack([ts[k] for ts in fp_out]).to(device) for k in range(len(axes))]
        self.shared = {n: q_in[0][j].to(device) for j, n in enumerate(names) if j >= n_main}
        self.idx = torch.zeros(batch, dtype=torch.long, device=device)
        self.beta = torch.ones((), device=device)
        self.reg_on = torch.zeros((), device=device)
        self.params = [q.alpha for q in rounding]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None

    def _body(self) -> torch.Tensor:
        starts = []
        for j in range(self.n_main):
            x = self.q[j].index_select(0, self.idx)
            if j < len(self.fp) and self.drop_prob > 0 and x.is_floating_point():
                f = self.fp[j].index_select(0, self.idx)
                x = torch.where(torch.rand_like(x) < self.drop_prob, f, x)
            starts.append(x)
        outs = self.run_vmapped(starts, self.shared)
        rec = batch_loss(outs, [t.index_select(0, self.idx) for t in self.tg], self.axes)
        total = rec
        if self.rounding:
            reg = sum(q.regularizer(self.beta) for q in self.rounding)
            total = rec + self.reg_on * self.round_weight * reg
        total.backward()
        return rec.detach()

    def capture(self, params: list[torch.Tensor]) -> None:
        """Warm up on a side stream, then capture one step. Raises whatever capture raises."""
        self.all_params = params
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._zero()
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self._zero()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss = self._body()
        self.graph = graph
        bad = [p for p in params if p.grad is None]
        if bad:
            raise RuntimeError(f"{len(bad)} learned tensors get no gradient in the captured step")

    def _zero(self) -> None:
        for p in self.all_params:
            p.grad = None

    def step(self, idx: list[int], beta: float | None) -> torch.Tensor:
        """Replay one step on images `idx` (beta None: regulariser off). The gradients are in the parameters'
        .grad (overwritten, not accumulated); returns the reconstruction loss (a device scalar)."""
        self.idx.copy_(torch.as_tensor(idx, dtype=torch.long), non_blocking=True)
        self.beta.fill_(beta if beta is not None else 1.0)
        self.reg_on.fill_(0.0 if beta is None else 1.0)
        self.graph.replay()
        return self.loss.clone()

    def release(self) -> None:
        self._zero()
        self.graph = self.loss = None
        self.q = self.fp = self.tg = []
        self.shared = {}
