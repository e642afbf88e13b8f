"""Block reconstruction (`--method recon`): AdaRound weights, LSQ activation step sizes, QDrop, unit by unit;
and CAR-SAM (`--method carsam`): the same with MAC before it and JCAR's joint decoder units.

    artifact = calibrate_recon(model, plan, config, feeds)
    artifact = calibrate_carsam(model, plan, config, feeds)

passes/units.py finds the units from the plan's structure (no torch); quantizers.py holds AdaRound /
LSQ+QDrop; capture.py takes what each unit learns from (its cached inputs and targets); loop.py runs the units
in graph order. The learned integers go into the artifact's WeightQuant.values and the learned step sizes into
its activation scales, so the emitted Q/DQ model computes what was learned.
"""
from __future__ import annotations

from dataclasses import replace

import onnx

from ...artifact import CalibrationArtifact
from ...config import QuantConfig
from ...passes.sites import QuantPlan
from ...passes.units import Unit, find_units, joint_units, unit_report

__all__ = ["Unit", "calibrate_carsam", "calibrate_recon", "find_units", "joint_units", "unit_report"]


def calibrate_recon(model: onnx.ModelProto, plan: QuantPlan, config: QuantConfig, feeds: list[dict],
                    progress=None, *, show_units: bool | None = None, stats: list | None = None, log=None,
                    baseline: list | None = None) -> CalibrationArtifact:
    """Calibrator init (config.recon.init_method), then reconstruction of every unit. `stats`, if given, receives
    one loop.UnitStats per unit (time, steps/s, first and last loss); `baseline` the calibrator's artifact (the
    report compares against it); `log` (progress.StageLog) a line per stage and per unit."""
    return _calibrate(model, plan, config, feeds, progress, show_units=show_units, stats=stats, baseline=baseline,
                      mac=False, jcar=None, log=log)


def calibrate_carsam(model: onnx.ModelProto, plan: QuantPlan, config: QuantConfig, feeds: list[dict],
                     progress=None, *, show_units: bool | None = None, stats: list | None = None, log=None,
                     baseline: list | None = None) -> CalibrationArtifact:
    """CAR-SAM: calibrator init, MAC on the attention sites of config.mac.scope (their corrected float weights
    are where AdaRound starts), then reconstruction with JCAR's joint decoder units (config.carsam.pairing).
    config.carsam.use_mac / use_jcar switch either part off (the ablation). `stats`, `baseline`: as
    calibrate_recon (the baseline is the calibrator's artifact before MAC), `log` too."""
    cs = config.carsam
    return _calibrate(model, plan, config, feeds, progress, show_units=show_units, stats=stats, baseline=baseline,
                      mac=cs.use_mac, jcar=cs.pairing if cs.use_jcar else None, log=log)


def _calibrate(model, plan, config, feeds, progress, *, show_units, stats, baseline, mac: bool, jcar: str | None,
               log=None):
    from ...torchexec.device import torch_device
    from ..baseline import calibrate_baseline
    from ...torchexec import OnnxModule
    from .loop import reconstruct

    torch_device(config.device)

    base_cfg = replace(config, method=config.recon.init_method)
    module = OnnxModule(model).to(config.device).eval()
    log = log or (lambda message: None)
    base = calibrate_baseline(model, plan, base_cfg, feeds, progress, module=module)
    del module
    log(f"{config.recon.init_method} initialisation done")
    if baseline is not None:
        baseline.append(base)
    deferred = DeferredMac(model, plan, feeds, config.mac, device=config.device) if mac and config.mac.when != "start" else None
    if mac and deferred is None:
        from ..mac import apply_mac

        base = apply_mac(model, plan, base, feeds, config.mac, device=config.device)
        log("MAC done")
    units = find_units(model, plan)
    fallback = None
    if jcar is not None:
        by_name = {u.name: u for u in units}
        units = joint_units(model, units, jcar)
        if config.carsam.joint_fallback:
            fallback = {u.name: [by_name[m] for m in u.members] for u in units if u.members}
    if show_units is None:
        show_units = progress is not None and not getattr(progress, "disable", False)
    nearest = frozenset()
    if mac and config.carsam.mac_rounding == "nearest":
        from ..mac import mac_weight_names

        nearest = frozenset(mac_weight_names(model, plan, config.mac))
    result, _ = reconstruct(model, plan, base, config, feeds, units, progress=show_units, before_unit=deferred,
                            nearest=nearest, log=log, fallback=fallback)
    if deferred is not None:
        result.artifact.info.update(deferred.info)
    if mac or jcar is not None:
        result.artifact.info.update({"method": config.method, "carsam_mac": str(mac), "carsam_jcar": str(jcar),
                                     "carsam_jcar_fallback": str(fallback is not None)})
    if stats is not None:
        stats.extend(result.units)
    result.artifact.check_names(model)
    return result.artifact


class DeferredMac:
    """MAC run once, just before the first unit that holds a weight MAC corrects (`MacConfig.when` "decoder"):
    the quantized model it measures then has every earlier unit (the encoder's) reconstructed, so its
    corrections fit the embeddings the decoder will get, not the calibrator's. Those weights' AdaRound starts
    from the corrected values."""

    def __init__(self, model, plan, feeds, config, device="cpu"):
        from ..mac import mac_weight_names

        self.model, self.plan, self.feeds, self.config, self.device = model, plan, feeds, config, device
        self.names = mac_weight_names(model, plan, config)
        self.info: dict[str, str] = {}
        self.done = False

    def __call__(self, reconstructor, unit: Unit) -> None:
        if self.done or not self.names & set(unit.weights):
            return
        from ..mac import mac_info, mac_sites

        self.done = True
        art = reconstructor.artifact({}, finished_only=True)
        fw, records = mac_sites(self.model, self.plan, art, self.feeds, self.config, device=self.device)
        reconstructor.set_float_weights({k: v for k, v in fw.items() if k in self.names})
        self.info = mac_info(self.config, records, self.feeds)
