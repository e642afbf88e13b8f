"""Block reconstruction, unit by unit, on the torch executor (QDrop recipe; shared/RESEARCH.md).

The quantized model is the ONNX graph with one Identity per activation site in front of exactly the consumers
the emitted Q/DQ rewires (so other consumers, e.g. residual adds, keep the float value as in the emitted file);
the executor replaces each Identity's output with the site's activation quantizer and each weight initializer
with its weight quantizer. The float model is the same module run without replacements.

For each unit in graph order:
1. its inputs are captured from the quantized model (every earlier unit finished: fully quantized, no drop)
   and from the float model, with the float output (before the residual add) as target (capture.py);
2. AdaRound offsets and LSQ step sizes of the unit are learned with Adam on the squared error summed over
   channels; every activation quantizer of the unit drops to float element-wise with probability drop_prob,
   and the unit's input mixes the quantized-model and float-model inputs the same way;
3. the unit is finished: rounding hard, step sizes fixed, no drop. Nothing of it is learned again.
An activation quantizer that two units share belongs to the first; the second sees it finished.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...artifact import CalibrationArtifact
from ...config import QuantConfig, ReconConfig
from ...errors import first_line
from ...passes.quant_points import insert_quant_points
from ...passes.sites import QuantPlan, WeightKind
from ...passes.units import Unit
from ...torchexec import OnnxModule
from ...torchexec.precision import tf32
from .capture import Captures
from .graph_step import batch_loss, image_loss
from .quantizers import AdaRoundWeight, FixedWeight, LsqActivation, beta_at, cosine_lr

VMAP_CHECK_RTOL = 1e-2   # batched vs per-image unit outputs (fixed quantizers): relative Frobenius error


def batch_agrees(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether a vmapped unit's output matches the per-image runs, stacked. Relative Frobenius error, not the
    largest element's: batched and per-image float arithmetic may put an activation on the other side of a
    quantization boundary, so one code of one image differs (at W6A6 a max-element test refused 8 of 34 units
    for that and they stepped image by image, 35 instead of 270 steps/s); a batching fault (an image reading
    another's values) differs everywhere."""
    if got.shape != ref.shape:
        return False
    return float((got - ref).double().norm()) <= VMAP_CHECK_RTOL * float(ref.double().norm()) + 1e-9


@dataclass
class UnitStats:
    name: str
    kind: str
    iters: int
    seconds: float
    loss_start: float
    loss_end: float
    cache_device: str
    curve: tuple[float, ...] = ()      # the reconstruction loss at every step (report: loss curves)
    step_mode: str = "eager"           # "cuda graph", or "eager" (with the reason when a capture was refused)
    kept: str = "learned"              # "learned", or "init" when the unit guard found the calibrator's rounding
                                       # and step sizes reconstruct the unit better (ReconConfig.unit_guard)
    guard_loss: tuple[float, float] = ()   # (learned, init) unit loss, fully quantized, on the guard images
    members: tuple[str, ...] = ()      # a joint unit's member units (report: JCAR against unit by unit)

    @property
    def steps_per_second(self) -> float:
        return self.iters / max(self.seconds, 1e-9)


@dataclass
class ReconResult:
    artifact: CalibrationArtifact
    units: list[UnitStats] = field(default_factory=list)


class Reconstructor:
    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, base: CalibrationArtifact, config: QuantConfig,
                 units: list[Unit], nearest: frozenset[str] = frozenset(), spare: tuple[Unit, ...] = ()):
        """`nearest`: weights kept at nearest rounding of their float values (no AdaRound) although a unit holds
        them. `spare`: units that may run after `units`' own (a rejected joint unit's members, in graph order)."""
        self.config, self.rc, self.plan, self.units = config, config.recon, plan, units
        self.device = torch.device(config.device)
        aug, self.qpoint = insert_quant_points(model, plan)
        self.module = OnnxModule(aug).to(self.device).eval()
        self.module.requires_grad_(False)
        inits = {t.name: t for t in model.graph.initializer}
        learned_w = {w for u in units for w in u.weights} - set(nearest)
        self.nearest = frozenset(nearest)
        self.float_weights = dict(base.float_weights)   # MAC's corrected weights and biases (quantized model only)
        self.wq: dict = {}
        for site in plan.weights:
            wq = base.weights[site.initializer]
            w = self.float_weights.get(site.initializer)
            w = numpy_helper.to_array(inits[site.initializer]) if w is None else w
            w = np.array(w, dtype=np.float32)   # a writable copy (torch.from_numpy)
            if site.kind is WeightKind.CONSTANT or site.initializer not in learned_w:
                self.wq[site.initializer] = FixedWeight(w, wq, self.device)
            else:
                self.wq[site.initializer] = AdaRoundWeight(w, wq, self.device)
        self.aq = {v: LsqActivation(aq, self.device, self.rc.drop_prob) for v, aq in base.activations.items()}
        self.base = base
        self.done_acts: set[str] = set()
        self.done_weights: set[str] = set()
        self._vmap_ok: dict = {}
        self.captures = Captures(self.module, model, aug, list(units) + list(spare), config)
        self._unit_acts = {v for u in units for v in u.activations}
        self._unit_weights = {w for u in units for w in u.weights}

    def hooks(self) -> dict:
        h: dict = {name: _Const(v, self.device) for name, v in self.float_weights.items() if name not in self.wq}
        h.update({name: q for name, q in self.wq.items()})
        h.update({self.qpoint[v]: q for v, q in self.aq.items()})
        return h

    # ---- capture -----------------------------------------------------------------------------------------

    def capture(self, unit: Unit, feeds: list[dict]) -> tuple[list, list, list, torch.device]:
        """Per feed: (quantized-model inputs, float-model inputs, float output), and where they are cached
        (capture.py)."""
        return self.captures.take(unit, feeds, self.hooks(), self._unsettled())

    def _unsettled(self) -> set[str]:
        """Quantization points and weights of units not finished yet: their quantizers may still change."""
        acts = {self.qpoint[v] for v in self._unit_acts - self.done_acts if v in self.qpoint}
        return acts | (self._unit_weights - self.done_weights)

    def _start(self, names, n_main, q_in, fp_in) -> dict:
        """A unit's start values for one image: quantized-model values; its inputs (the first len(fp_in)) mixed
        element-wise with the float-model inputs (QDrop) while the unit learns."""
        start = {}
        for j, n in enumerate(names):
            x = q_in[j].to(self.device, non_blocking=True)
            if j < len(fp_in) and x.is_floating_point() and self.rc.drop_prob > 0:
                f = fp_in[j].to(self.device, non_blocking=True)
                x = torch.where(torch.rand_like(x) < self.rc.drop_prob, f, x)
            start[n] = x
        return start

    def _run(self, unit, start, hooks) -> tuple[torch.Tensor, ...]:
        targets = [v for v, _ in unit.losses]
        out = self.module.run(start=start, outputs=targets, replace=hooks)
        return tuple(out[v] for v in targets)

    def _run_vmapped(self, unit, names, n_main, starts, hooks) -> tuple[torch.Tensor, ...]:
        """The unit on a batch of images: torch.func.vmap over the per-image graph (SAM graphs are exported for
        batch 1); inputs that are no float activations (shape values) are shared, not batched."""
        return self._run_batched(unit, names, n_main, [torch.stack([s[n] for s in starts]) for n in names[:n_main]],
                                 {n: starts[0][n] for n in names[n_main:]}, hooks)

    def _run_batched(self, unit, names, n_main, batched: list, shared: dict, hooks) -> tuple[torch.Tensor, ...]:
        def f(b, sh):
            return self._run(unit, {**dict(zip(names[:n_main], b)), **sh}, hooks)
        return torch.func.vmap(f, in_dims=(0, None), randomness="different")(batched, shared)

    def _graph_step(self, unit, names, n_main, q_in, fp_in, fp_out, where, bs, hooks, axes, rounding, acts):
        """(GraphStep or None, step mode): the unit's step captured as a CUDA graph, where the device allows."""
        if self.device.type != "cuda" or not self.rc.cuda_graphs:
            return None, "eager"
        if where != self.device:
            return None, "eager (cached inputs kept on the host)"
        from .graph_step import GraphStep

        g = GraphStep(lambda b, sh: self._run_batched(unit, names, n_main, b, sh, hooks), names, n_main, q_in,
                      fp_in, fp_out, axes, rounding, self.rc.round_weight, self.rc.drop_prob, bs, self.device)
        try:
            g.capture([q.alpha for q in rounding] + [q.scale for q in acts])
        except Exception as e:   # a host sync or an op graphs refuse: this unit runs eagerly
            g.release()
            torch.cuda.synchronize(self.device)
            return None, f"eager (capture refused: {type(e).__name__}: {first_line(e, 120)})"
        return g, "cuda graph"

    def _vmap_works(self, unit, names, n_main, q_in, hooks) -> bool:
        """Whether the vmapped unit computes what per-image runs compute (fixed quantizers, two images);
        remembered per unit kind and role."""
        key = (unit.kind, unit.role)
        if key not in self._vmap_ok:
            ok = False
            if len(q_in) >= 2:
                starts = [{n: x.to(self.device) for n, x in zip(names, q_in[i])} for i in (0, 1)]
                states = [(q, q.learning) for q in (*self.wq.values(), *self.aq.values()) if hasattr(q, "learning")]
                try:
                    for q, _ in states:
                        q.learning = False
                    with torch.no_grad():
                        refs = [self._run(unit, s, hooks) for s in starts]
                        gots = self._run_vmapped(unit, names, n_main, starts, hooks)
                    ok = True
                    for k, got in enumerate(gots):
                        ok = ok and batch_agrees(got, torch.stack([r[k] for r in refs]))
                except Exception:   # an op the executor cannot batch: per-image runs instead
                    ok = False
                finally:
                    for q, was in states:
                        q.learning = was
                    for q in self.wq.values():
                        if isinstance(q, AdaRoundWeight) and q.learning:
                            q._hard = None
            self._vmap_ok[key] = ok
        return self._vmap_ok[key]

    def _eager_step(self, unit, names, n_main, idx, q_in, fp_in, fp_out, bs, use_vmap, hooks, axes, rounding,
                    beta) -> torch.Tensor:
        """Loss and gradients of one step on images `idx` (vmapped, or image by image); the regulariser's
        gradient is added unless `beta` is None (warm-up). Returns the reconstruction loss (detached)."""
        starts = [self._start(names, n_main, q_in[i], fp_in[i]) for i in idx]
        tgts = [[x.to(self.device, non_blocking=True) for x in fp_out[i]] for i in idx]
        if use_vmap:
            outs = self._run_vmapped(unit, names, n_main, starts, hooks)
            rec_t = batch_loss(outs, [torch.stack([t[k] for t in tgts]) for k in range(len(axes))], axes)
            rec_t.backward()
            rec_t = rec_t.detach()
        else:
            rec_t = 0.0
            for start, tgt in zip(starts, tgts):
                outs = self._run(unit, start, hooks)
                rec_i = image_loss(outs, tgt, axes) / bs
                rec_i.backward()
                rec_t = rec_t + rec_i.detach()
        if beta is not None and rounding:
            reg = self.rc.round_weight * sum(q.regularizer(beta) for q in rounding)
            reg.backward()
        return rec_t

    # ---- one unit ----------------------------------------------------------------------------------------

    def reconstruct(self, unit: Unit, feeds: list[dict], iters: int, progress: bool, gen: torch.Generator) -> UnitStats:
        t0 = time.perf_counter()
        q_in, fp_in, fp_out, where = self.capture(unit, feeds)
        names, n_main, q_in = batch_order(list(unit.inputs) + list(unit.extra_inputs), len(unit.inputs), q_in)
        rounding = [self.wq[w] for w in unit.weights if isinstance(self.wq[w], AdaRoundWeight)]
        acts = [self.aq[v] for v in unit.activations if v in self.aq and v not in self.done_acts]
        init = ([q.alpha.detach().clone() for q in rounding], [q.scale.detach().clone() for q in acts])
        for q in rounding + acts:
            q.start()
        dev = self.config.device
        opt_w = torch.optim.Adam([q.alpha for q in rounding], lr=self.rc.round_lr_for(dev)) if rounding else None
        opt_a = torch.optim.Adam([{"params": [q.scale], "base_lr": self.rc.scale_lr_for(float(q.scale.detach()), dev)}
                                  for q in acts], lr=self.rc.scale_lr_base(dev)) \
            if acts and self.rc.scale_lr_base(dev) > 0 else None   # rate 0: the step sizes stay as calibrated
        hooks = self.hooks()
        axes = [a for _, a in unit.losses]
        losses: list[float] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=iters, desc=f"recon {unit.name}", unit="step", leave=False)
        bs = max(1, min(self.rc.batch_for(self.config.device), len(feeds)))
        use_vmap = bs > 1 and self._vmap_works(unit, names, n_main, q_in, hooks)
        graph, mode = (None, "eager" if use_vmap or bs == 1 else "eager (image by image: the batched unit differs)")
        if use_vmap:
            graph, mode = self._graph_step(unit, names, n_main, q_in, fp_in, fp_out, where, bs, hooks, axes,
                                           rounding, acts)
        try:
            for step in range(iters):
                idx = torch.randint(0, len(feeds), (bs,), generator=gen).tolist()
                if opt_a is not None:
                    for g in opt_a.param_groups:
                        g["lr"] = cosine_lr(g["base_lr"], step, iters)
                beta = beta_at(step, iters, self.rc.warmup, self.rc.beta_start, self.rc.beta_end)
                if graph is not None:   # the replay overwrites the gradients in place: no zero_grad
                    rec_t = graph.step(idx, beta)
                else:
                    rec_t = self._eager_step(unit, names, n_main, idx, q_in, fp_in, fp_out, bs, use_vmap, hooks,
                                             axes, rounding, beta)
                for opt in (opt_w, opt_a):
                    if opt is not None:
                        opt.step()
                        if graph is None:
                            opt.zero_grad(set_to_none=True)
                losses.append(rec_t)
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 0 or step == iters - 1:
                        bar.set_postfix(loss=f"{float(torch.stack(losses[-20:]).mean()):.4g}")
        finally:
            if bar is not None:
                bar.close()
            if graph is not None:
                graph.release()
            for q in rounding + acts:
                q.finish()
            self.done_acts.update(unit.activations)
            self.done_weights.update(unit.weights)
        kept, guard = "learned", ()
        if self.rc.unit_guard:
            kept, guard = self._guard(unit, names, q_in, fp_out, hooks, axes, rounding, acts, init)
        losses = [float(x) for x in losses]
        k = max(1, min(20, len(losses) // 10 or 1))
        return UnitStats(unit.name, unit.kind, iters, time.perf_counter() - t0,
                         float(np.mean(losses[:k])) if losses else float("nan"),
                         float(np.mean(losses[-k:])) if losses else float("nan"), where.type, tuple(losses),
                         step_mode=mode, kept=kept, guard_loss=guard, members=tuple(unit.members))

    def _final_loss(self, unit, names, q_in, fp_out, hooks, axes) -> float:
        """The unit's loss as emitted (every quantizer fixed, no drop, hard rounding) on the first
        `guard_images` calibration images."""
        n = min(self.rc.guard_images, len(q_in))
        total = 0.0
        with torch.no_grad():
            for i in range(n):
                start = {nm: q_in[i][j].to(self.device, non_blocking=True) for j, nm in enumerate(names)}
                outs = self._run(unit, start, hooks)
                total += float(image_loss(outs, [t.to(self.device) for t in fp_out[i]], axes))
        return total / max(n, 1)

    def _guard(self, unit, names, q_in, fp_out, hooks, axes, rounding, acts, init) -> tuple[str, tuple]:
        """Keep what the unit learned only if it reconstructs the unit better than where it started (the
        calibrator's nearest rounding and step sizes: AdaRound's initial alpha hard-rounds to nearest). A
        schedule too short to converge must not leave a unit worse than the calibrator it started from."""
        if not rounding and not acts:
            return "learned", ()
        learned = ([q.alpha.detach().clone() for q in rounding], [q.scale.detach().clone() for q in acts])

        def load(state):
            with torch.no_grad():
                for q, a in zip(rounding, state[0]):
                    q.alpha.copy_(a)
                for q, sc in zip(acts, state[1]):
                    q.scale.copy_(sc)
            for q in rounding + acts:
                q.finish()
        loss_learned = self._final_loss(unit, names, q_in, fp_out, hooks, axes)
        load(init)
        loss_init = self._final_loss(unit, names, q_in, fp_out, hooks, axes)
        if loss_init < loss_learned:
            return "init", (loss_learned, loss_init)
        load(learned)
        return "learned", (loss_learned, loss_init)

    def finished(self) -> tuple[frozenset[str], frozenset[str]]:
        """(activations, weights) of the finished units, for `reopen`."""
        return frozenset(self.done_acts), frozenset(self.done_weights)

    def reopen(self, unit: Unit, before: tuple[frozenset[str], frozenset[str]]) -> None:
        """Let other units learn the quantizers that `unit` learned (not those finished before it, given by
        `finished()` taken before it ran). For a joint unit the guard rejected: the calibrator's values are back
        in them, and its members run next, one by one. The frontier is dropped (its values lie beyond them)."""
        self.done_acts -= set(unit.activations) - before[0]
        self.done_weights -= set(unit.weights) - before[1]
        self.captures.drop_frontier()

    def artifact(self, info: dict, finished_only: bool = False) -> CalibrationArtifact:
        """The calibration result: learned step sizes and integer weights (`finished_only`: the integers of the
        finished units only; the others keep the calibrator's scales without fixed values)."""
        art = CalibrationArtifact(activations={v: q.activation_quant() for v, q in self.aq.items()},
                                  weights=dict(self.base.weights), info={**self.base.info, **info},
                                  float_weights=dict(self.float_weights))
        for name, q in self.wq.items():
            if isinstance(q, AdaRoundWeight) and (not finished_only or name in self.done_weights):
                art.weights[name] = q.weight_quant()
        return art

    def set_float_weights(self, corrected: dict[str, np.ndarray]) -> None:
        """New float weights and biases for units not reconstructed yet (deferred MAC): AdaRound starts from
        them."""
        done = sorted(set(corrected) & self.done_weights)
        if done:
            raise ValueError(f"{done[0]} belongs to a finished unit; its rounding is already learned")
        self.captures.drop_frontier()   # values behind it may read the corrected weights
        for name, w in corrected.items():
            self.float_weights[name] = w
            q = self.wq.get(name)
            if q is not None:
                kind = FixedWeight if name in self.nearest else type(q)
                self.wq[name] = kind(np.array(w, dtype=np.float32), self.base.weights[name], self.device)


class _Const:
    """A hook that replaces an initializer by a fixed tensor (MAC's corrected biases in the quantized model)."""

    def __init__(self, value: np.ndarray, device):
        self.t = torch.as_tensor(np.asarray(value, dtype=np.float32), device=device)

    def __call__(self, _param: torch.Tensor) -> torch.Tensor:
        return self.t


def batch_order(names: list[str], n_inputs: int, q_in: list[list]) -> tuple[list[str], int, list[list]]:
    """A unit's start values ordered for batched steps: its inputs (QDrop mixes them), then the other values its
    nodes read that are float activations of each image (a joint unit's residual stream and prompt tokens, read
    from outside it: batched with the inputs, not mixed), then the rest (shape values: shared by every image).
    Returns (names, number batched, q_in in that order). A float value shared as if every image had the first
    one's makes the vmapped unit differ from per-image runs, and the unit falls back to image-by-image steps."""
    first = q_in[0] if q_in else []
    extra = range(n_inputs, len(names))
    order = list(range(n_inputs)) + [j for j in extra if first[j].is_floating_point()]
    n_batch = len(order)
    order += [j for j in extra if not first[j].is_floating_point()]
    return [names[j] for j in order], n_batch, [[xs[j] for j in order] for xs in q_in]


def _log_unit(log, u: "UnitStats", where: str) -> None:
    if log is not None:
        log(f"unit {where} {u.name}: {u.iters} steps in {u.seconds:.1f} s ({u.steps_per_second:.1f}/s, "
            f"{u.step_mode}), loss {u.loss_start:.4g} -> {u.loss_end:.4g}"
            + (", calibrator kept (unit guard)" if u.kept == "init" else ""))


def reconstruct(model: onnx.ModelProto, plan: QuantPlan, base: CalibrationArtifact, config: QuantConfig,
                feeds: list[dict], units: list[Unit], progress: bool = True,
                before_unit=None, nearest: frozenset[str] = frozenset(), log=None,
                fallback: dict[str, list[Unit]] | None = None) -> tuple[ReconResult, "Reconstructor"]:
    """Every unit in order. `before_unit(reconstructor, unit)`, if given, runs before each unit (deferred MAC);
    `nearest`: weights that keep nearest rounding (Reconstructor); `log(message)`: a line per unit.
    `fallback`: joint unit name -> its members; a joint unit whose learned values the unit guard rejects is
    followed by its members reconstructed one by one (their stats follow its own)."""
    rc: ReconConfig = config.recon
    iters = rc.iters_for(config.device, config.bits)
    gen = torch.Generator().manual_seed(config.seed)
    devices = [torch.device(config.device)] if torch.device(config.device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        fallback = fallback or {}
        spare = tuple(m for u in units for m in fallback.get(u.name, ()))
        r = Reconstructor(model, plan, base, config, units, nearest, spare)
        stats = []
        outer = None
        if progress:
            from tqdm import tqdm

            outer = tqdm(total=len(units), desc="reconstruction units", unit="unit")
        for k, unit in enumerate(units, 1):
            if before_unit is not None:
                before_unit(r, unit)
            before = r.finished()
            with tf32(rc.tf32 and r.device.type == "cuda"):
                stats.append(r.reconstruct(unit, feeds, rc.unit_iters(config.device, unit, config.bits), progress, gen))
            _log_unit(log, stats[-1], f"{k}/{len(units)}")
            if stats[-1].kept == "init" and unit.name in fallback:
                r.reopen(unit, before)
                for m in fallback[unit.name]:
                    with tf32(rc.tf32 and r.device.type == "cuda"):
                        stats.append(r.reconstruct(m, feeds, rc.unit_iters(config.device, m, config.bits), progress, gen))
                    _log_unit(log, stats[-1], f"{k}/{len(units)}, member of {unit.name}")
            if outer is not None:
                outer.set_postfix(unit=unit.name, loss=f"{stats[-1].loss_end:.4g}")
                outer.update(1)
        if outer is not None:
            outer.close()
    info = {"method": "recon", "recon_iters": str(iters), "recon_decoder_factor": str(rc.decoder_factor),
            "recon_units": str(len(units)),
            "recon_batch": str(rc.batch_for(config.device)),
            "recon_init": rc.init_method}
    return ReconResult(r.artifact(info), stats), r
