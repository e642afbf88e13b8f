"""The quantize pipeline: plan -> calibration data -> [scale migration] -> calibrate on the torch executor -> emit
Q/DQ -> check.

    model --plan_quantization--> QuantPlan --(smooth_model) calibrate--> CalibrationArtifact --emit_qdq--> Q/DQ model

`quantize` runs it all (optionally saving the artifact); `emit` writes the Q/DQ model from a saved artifact
without calibrating again, through the same `emit_model`, so both give the same bytes.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import CalibrationArtifact, load_artifact, save_artifact
from .config import DEFAULT_KEEP_FLOAT, HELDOUT, MAX_REPORT_IMAGES, QuantConfig
from .data.builtin import HELDOUT_SEED, builtin_calibration_set
from .data.prompts import load_calibration_set
from .errors import ArtifactError, InputError, OutputError
from .modelio import check_writable, file_sha256, load_model, save_model
from .qmath import sqnr_db


@dataclass
class QuantizeReport:
    output: Path
    weights_by_kind: dict[str, int]
    activations_by_kind: dict[str, int]
    attention_by_role: dict[str, int]
    kept_float: int
    sqnr_db: dict[str, float]            # graph output -> SQNR of quantized vs FP on held-out prompts
    input_bytes: int
    output_bytes: int
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # wall time by stage
    recon_units: list = field(default_factory=list)            # --method recon: calib.recon.loop.UnitStats per unit
    mac: dict[str, str] = field(default_factory=dict)          # --method carsam: the artifact's mac_* info entries
    smooth: dict[str, str] = field(default_factory=dict)       # --smooth: the artifact's smooth_* info entries

    def lines(self) -> list[str]:
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) or "none"  # noqa: E731
        return [f"weights quantized: {sum(self.weights_by_kind.values())} ({fmt(self.weights_by_kind)}); "
                f"{self.kept_float} weight layers kept float",
                f"activations quantized: {sum(self.activations_by_kind.values())} ({fmt(self.activations_by_kind)})",
                f"attention sites: {sum(self.attention_by_role.values())} ({fmt(self.attention_by_role)})",
                *(["output SQNR vs FP on held-out prompts: " + ", ".join(f"{k} {v:.1f} dB" for k, v in self.sqnr_db.items())]
                  if self.sqnr_db else []),
                f"size: {self.output_bytes / 1e6:.1f} MB ({self.output_bytes / max(self.input_bytes, 1):.3f}x of "
                f"{self.input_bytes / 1e6:.1f} MB) -> {self.output}",
                "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())] + self._smooth_lines() + \
            self._mac_lines() + self._recon_lines()

    def _smooth_lines(self) -> list[str]:
        if "smooth_alpha" not in self.smooth:
            return []
        pairs = self.smooth.get("smooth_pairs", "0")
        from .calib.smooth import NO_PAIR_REASON

        return [f"scale migration (--smooth {self.smooth['smooth_alpha']}): {pairs} norm -> weight-layer pairs"
                + (f"; none found ({NO_PAIR_REASON})" if pairs == "0" else "")]

    def _mac_lines(self) -> list[str]:
        if self.mac.get("mac") != "on":
            return []
        rises = int(self.mac.get("mac_check_rises", "0"))
        return [f"MAC: {self.mac.get('mac_sites', '?')} attention sites ({self.mac.get('mac_skipped_sites', '0')} "
                f"skipped), steps {self.mac.get('mac_steps', '?')} on {self.mac.get('mac_images', '?')} images"
                + (f"; {rises} site(s) end with a higher check-image Q.K^T error than the uncorrected model "
                   f"(corrections upstream of them compound)" if rises else "")]

    def _recon_lines(self) -> list[str]:
        if not self.recon_units:
            return []
        by_kind: dict[str, list] = {}
        for u in self.recon_units:
            by_kind.setdefault(u.kind, []).append(u)
        rate = ", ".join(f"{k} {sum(u.iters for u in us) / sum(u.seconds for u in us):.1f}" for k, us in by_kind.items())
        per = sorted({u.iters for u in self.recon_units})
        per_unit = str(per[0]) if len(per) == 1 else f"{per[0]}-{per[-1]}"
        return [f"reconstruction: {len(self.recon_units)} units x {per_unit} steps "
                f"({sum(u.iters for u in self.recon_units)} in all) in {sum(u.seconds for u in self.recon_units):.0f} s; "
                f"steps/s by unit kind (capture included): {rate}"] + self._guard_lines() + self._step_mode_lines()

    def _guard_lines(self) -> list[str]:
        init = [u.name for u in self.recon_units if getattr(u, "kept", "learned") == "init"]
        if not any(getattr(u, "guard_loss", ()) for u in self.recon_units):
            return []
        return [f"unit guard: the calibrator's rounding and step sizes kept in {len(init)} of "
                f"{len(self.recon_units)} units" + (f" ({', '.join(init)})" if init else "")]

    def _step_mode_lines(self) -> list[str]:
        modes = [getattr(u, "step_mode", "eager") for u in self.recon_units]
        if all(m == "eager" for m in modes):
            return []
        refused = sorted({m for m in modes if m.startswith("eager (")})
        return [f"reconstruction steps as CUDA graphs: {modes.count('cuda graph')} of {len(modes)} units"] + \
            [f"  {m}" for m in refused]


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.name in (path.name, path.name + ".data"))


def calibration_samples(config: QuantConfig, image_size: int, calib_images, calib_prompts):
    """(calibration samples, held-out samples)."""
    if calib_images is None:
        calib = builtin_calibration_set(config.num_calib, config.seed, image_size)
        held = builtin_calibration_set(HELDOUT, config.seed, image_size, data_seed=HELDOUT_SEED, warn=False)
        return calib, held
    samples = load_calibration_set(calib_images, calib_prompts, config.num_calib + HELDOUT, config.seed, image_size,
                                   asked=config.num_calib)
    if len(samples) <= config.num_calib:
        warnings.warn(f"{calib_images} has no images left over for held-out prompts; the SQNR in the summary "
                      "is measured on calibration images", stacklevel=2)
        return samples, samples[:HELDOUT]
    return samples[: config.num_calib], samples[config.num_calib:]


def report_samples(config: QuantConfig, image_size: int, calib_images, calib_prompts, calib: list, held: list,
                   num: int) -> list:
    """The report's held-out prompts: the summary's `held` when `num` is theirs (the default); else `num` images
    drawn apart from the calibration draw, so that the calibration set, and with it the quantized model, stays
    the same as without the report: the built-in set's held-out seed, or, from a folder, images of another draw
    (seed + 1) that the calibration set does not hold."""
    if num == len(held):
        return held
    if calib_images is None:
        return builtin_calibration_set(num, config.seed, image_size, data_seed=HELDOUT_SEED, warn=False)
    used = {s.source for s in calib}
    pool = load_calibration_set(calib_images, calib_prompts, config.num_calib + num, config.seed + 1, image_size,
                                asked=config.num_calib)
    rest = [s for s in pool if s.source not in used][:num]
    if len(rest) < num:
        warnings.warn(f"{calib_images} has {len(rest)} images outside the calibration set for --report-images "
                      f"{num}; the report uses {len(rest) or len(held)}", stacklevel=2)
    return rest or held


def output_sqnr(fp_path: Path, q_model, feeds: list[dict], provider: str | None = None) -> dict[str, float]:
    """SQNR of each output of `q_model` (a path or a ModelProto) against the FP model at `fp_path`."""
    from .runtime import OrtRuntime
    from .runtime.providers import ort_runtime_for

    rt = ort_runtime_for(provider) if provider is not None else OrtRuntime()

    def outputs(model, what: str) -> dict[str, list]:
        sess, out = rt.session(model, what), {}
        for feed in feeds:
            for k, v in sess.run(feed).items():
                out.setdefault(k, []).append(v)
        return out
    refs = outputs(fp_path, "FP model")        # one session at a time: vit_h's sessions take GBs each
    tests = outputs(q_model, "quantized model")
    return {k: sqnr_db(np.concatenate([r.ravel() for r in refs[k]]), np.concatenate([t.ravel() for t in tests[k]]))
            for k in refs}


def emit_model(model, plan, artifact: CalibrationArtifact, config: QuantConfig):
    """(Q/DQ model, notes): emission for config.target, then the TensorRT rules for target trt."""
    from .passes.emit import emit_qdq, target_options

    notes: list[str] = []
    qmodel = emit_qdq(model, plan, artifact, **target_options(config))
    if config.target == "trt":
        from .passes.trt_rules import check_trt, errors, format_report

        violations = check_trt(qmodel)
        if errors(violations):
            notes.append("TensorRT rules: " + format_report(violations).replace("\n", "; "))
            warnings.warn(notes[-1], stacklevel=3)
    return qmodel, notes


def _plan(model, config: QuantConfig):
    """(model at a Q/DQ-capable opset, plan, notes)."""
    from .deploy.official import to_quantizable_opset
    from .passes.plan import plan_quantization, unmatched_patterns

    notes = []
    model, converted = to_quantizable_opset(model)   # segment-anything's own decoder export is opset 17
    if converted:
        notes.append(converted)
        warnings.warn(converted, stacklevel=3)
    plan = plan_quantization(model, config)
    # only the user's own patterns: the defaults name parts that a decoder-only or encoder-only model lacks
    given = tuple(p for p in config.keep_float if p not in DEFAULT_KEEP_FLOAT)
    for pattern in unmatched_patterns(model, given):
        notes.append(f"--keep-float {pattern!r} matches no node of this model: it keeps nothing float")
        warnings.warn(notes[-1], stacklevel=3)
    if not plan.attention:
        notes.append("no attention block found: quantizing the linear layers only (see `carsam-onnx inspect`)")
        warnings.warn(notes[-1], stacklevel=3)
    return model, plan, notes


def quantize(model_path: str | Path, output: str | Path, config: QuantConfig = QuantConfig(), *,
             calib_images: str | Path | None = None, calib_prompts: str | Path | None = None,
             encoder: str | Path | None = None, embeddings: str | Path | None = None,
             save_calibration: str | Path | None = None, force: bool = False, progress: bool = True,
             provider: str | None = None, report_dir: str | Path | None = None,
             report_compare: str | Path | None = None, report_images: int = HELDOUT) -> QuantizeReport:
    """Calibrate `model_path` and write the Q/DQ model to `output` (and the artifact to `save_calibration`);
    `provider`: ONNX Runtime provider of the held-out check; `report_dir`: also write deploy/report.py's report;
    `report_compare`: an earlier report (its folder or recon_units.json) whose reconstruction loss curves the
    report draws beside this run's (e.g. unit by unit against JCAR); `report_images`: held-out prompts the
    report measures on (the summary's SQNR stays on its own HELDOUT)."""
    from tqdm import tqdm

    from .calib.feeds import build_feeds, image_size, model_kind
    from .calib.registry import check_config
    from .calib.smooth import calibrate_smoothed
    from .passes.emit import check_opset
    from .progress import stage_log
    from .torchexec.device import torch_device

    method = check_config(config)
    torch_device(config.device)                              # a device this machine lacks fails before any work
    model_path, output = Path(model_path), Path(output)
    inputs = [model_path, encoder, embeddings, calib_prompts]
    check_writable(output, force, inputs=inputs)
    if save_calibration is not None:
        check_writable(save_calibration, force, inputs=inputs)
        if Path(save_calibration).resolve() == output.resolve():
            raise OutputError(f"--save-calibration {save_calibration} is the output model's path; give another file")
    if provider is not None:   # an unavailable provider fails before any long work
        from .runtime.providers import ort_providers

        ort_providers(provider)
    compare = _report_compare(report_compare, report_dir)   # read now: a bad file fails before any work
    if report_images != HELDOUT and report_dir is None:
        raise InputError("--report-images needs --report DIR (it sets how many held-out prompts the report uses)")
    if not 1 <= report_images <= MAX_REPORT_IMAGES:
        raise InputError(f"--report-images {report_images}: give 1 to {MAX_REPORT_IMAGES}")
    if report_images != HELDOUT and embeddings is not None:
        raise InputError("--report-images needs the report's images' own embeddings: give --encoder instead of "
                         "--embeddings (with --embeddings the report uses the summary's prompts)")
    if report_dir is not None:
        from .deploy.report import check_report_dir

        check_report_dir(report_dir, force)
    clock = _Clock()
    model = load_model(model_path)
    kind = model_kind(model, model_path)   # a graph that is not SAM: refused before any work
    model, plan, notes = _plan(model, config)
    check_opset(model)              # an opset Q/DQ cannot be written at (after any conversion in _plan)
    size = image_size(model)
    clock.lap("load and plan")
    calib, held = calibration_samples(config, size, calib_images, calib_prompts)
    feeds = build_feeds(model, calib, encoder, embeddings, mask_refinement=config.calib_mask_input)
    held_feeds = build_feeds(model, held, encoder, embeddings, mask_refinement=False)   # one per held-out sample
    clock.lap("calibration data")
    # from here on, where no terminal shows the bars: a line per stage (bad input has failed before, one line)
    clock.log = stage_log(progress)
    clock.log(f"model and calibration data ready ({clock.laps['load and plan'] + clock.laps['calibration data']:.1f} s); "
              f"calibrating ({config.method}, {config.bits}) on {len(feeds)} samples")
    with tqdm(total=len(feeds), desc=f"calibrating ({config.method}, {config.bits})", unit="img",
              disable=not progress or None) as bar:
        stats: list = []
        baseline: list = []
        kw = {**({"stats": stats} if method.stats else {}), **({"baseline": baseline} if method.baseline else {}),
              **({"log": clock.log} if method.log else {})}
        artifact = calibrate_smoothed(method.calibrate, model, plan, config, feeds, bar, **kw)
    clock.lap("calibration")
    qmodel, emit_notes = emit_model(model, plan, artifact, config)
    clock.lap("emit")
    sqnr = output_sqnr(model_path, qmodel, held_feeds, provider)   # before the output exists: nothing to undo if this fails
    if kind == "official_decoder":   # and SAM's refinement step (calib/feeds.py): has_mask_input 1
        from .calib.feeds import mask_refinement_feeds

        refine = mask_refinement_feeds(model, held_feeds)
        sqnr.update({f"{k} (mask input)": v for k, v in output_sqnr(model_path, qmodel, refine, provider).items()})
    clock.lap("held-out SQNR")
    save_model(qmodel, output, force=force)
    try:
        if save_calibration is not None:
            save_artifact(save_calibration, artifact, config, file_sha256(model_path), force=force)
    except BaseException:   # a command that fails leaves no output behind
        output.unlink(missing_ok=True)
        output.with_name(output.name + ".data").unlink(missing_ok=True)
        raise
    clock.lap("save")
    report = _report(model_path, output, plan, notes + emit_notes)
    report.sqnr_db = sqnr
    report.recon_units = stats
    report.mac = {k: v for k, v in artifact.info.items() if k.startswith("mac")}
    report.smooth = {k: v for k, v in artifact.info.items() if k.startswith("smooth")}
    if report_dir is not None:
        from .deploy.report import write_quant_report

        shown = report_samples(config, size, calib_images, calib_prompts, calib, held, report_images)
        shown_feeds = held_feeds if shown is held else build_feeds(model, shown, encoder, embeddings,
                                                                   mask_refinement=False)
        write_quant_report(report_dir, model_path, output, model, qmodel, plan, artifact, shown_feeds, report,
                           held_samples=shown, provider=provider, progress=progress,
                           extra=_report_extra(stats, baseline, compare, run_label(config)))
        clock.lap("report")
    report.seconds = clock.laps
    return report


def run_label(config: QuantConfig) -> str:
    """How a report names this run's reconstruction (its loss curves' legend)."""
    if config.method != "carsam":
        return config.method
    c = config.carsam
    return (f"carsam ({'MAC' if c.use_mac else 'no MAC'}, "
            + (f"JCAR {c.pairing}" if c.use_jcar else "unit by unit") + ")")


def _report_compare(path, report_dir) -> tuple[str, list] | None:
    if path is None:
        return None
    if report_dir is None:
        raise InputError("--report-compare needs --report DIR (it adds a second run's loss curves to the report)")
    from .deploy.report_recon import load_units

    return load_units(path)


def _report_extra(stats: list, baseline: list, compare: tuple[str, list] | None, label: str) -> dict | None:
    """ReportContext.extra of a method run: its reconstruction units (and an earlier run's, to compare), and
    the calibrator artifact it started from as the report's baseline (attention dissipation: FP / calibrator
    only / this run)."""
    extra: dict = {}
    if stats:
        extra["recon_units"] = stats
        extra["recon_labels"] = (label,)
    if compare is not None:
        other, units = compare
        extra["recon_compare"] = units
        extra["recon_labels"] = (label, other if other != label else f"{other} (compare)")
    if baseline:
        extra["baseline"] = baseline[0]
        extra["baseline_label"] = "calibrator only"
    return extra or None


def emit(model_path: str | Path, calibration: str | Path, output: str | Path, *, force: bool = False) -> QuantizeReport:
    """Write the Q/DQ model of `model_path` from a saved calibration (no calibration run)."""
    model_path, output = Path(model_path), Path(output)
    check_writable(output, force, inputs=[model_path, calibration])
    saved = load_artifact(calibration)
    sha = file_sha256(model_path) if model_path.is_file() else None
    if sha is not None and sha != saved.model_sha256:
        raise ArtifactError(f"{calibration} was made for another model (sha256 {saved.model_sha256[:12]}..., "
                            f"{model_path.name} has {sha[:12]}...); calibrate this model with quantize")
    clock = _Clock()
    model = load_model(model_path)
    model, plan, notes = _plan(model, saved.config)
    qmodel, emit_notes = emit_model(model, plan, saved.artifact, saved.config)
    save_model(qmodel, output, force=force)
    clock.lap("emit and save")
    report = _report(model_path, output, plan, notes + emit_notes)
    report.seconds = clock.laps
    return report


def _report(model_path: Path, output: Path, plan, notes: list[str]) -> QuantizeReport:
    return QuantizeReport(
        output=output,
        weights_by_kind=dict(Counter(w.kind.value for w in plan.weights)),  # "constant": INT8 position tables
        activations_by_kind=dict(Counter(a.kind.value for a in plan.activations)),
        attention_by_role=dict(Counter(s.role.value for s in plan.attention)),
        kept_float=len(plan.kept_float), sqnr_db={}, input_bytes=file_bytes(model_path),
        output_bytes=file_bytes(output), warnings=notes)


class _Clock:
    """Wall time by stage; once `log` is set (progress.stage_log), each stage's end is also logged on stderr."""

    def __init__(self):
        import time

        from .progress import StageLog

        self._now = time.perf_counter
        self._t = self._now()
        self.laps: dict[str, float] = {}
        self.log = StageLog(False)

    def lap(self, name: str) -> None:
        t = self._now()
        self.laps[name] = t - self._t
        self._t = t
        self.log(f"{name}: {self.laps[name]:.1f} s")


