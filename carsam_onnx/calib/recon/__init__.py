"""Block reconstruction (`--method recon`): AdaRound weights, LSQ activation step sizes, QDrop, unit by unit.

    artifact = calibrate_recon(model, plan, config, feeds)

passes/units.py finds the units from the plan's structure (no torch); quantizers.py holds AdaRound /
LSQ+QDrop; loop.py runs the units in graph order. The learned integers go into the artifact's
WeightQuant.values and the learned step sizes into its activation scales, so the emitted Q/DQ model computes
what was learned.
"""
from __future__ import annotations

from dataclasses import replace

import onnx

from ...artifact import CalibrationArtifact
from ...config import QuantConfig
from ...passes.sites import QuantPlan
from ...passes.units import Unit, find_units, unit_report

__all__ = ["Unit", "calibrate_recon", "find_units", "unit_report"]


def calibrate_recon(model: onnx.ModelProto, plan: QuantPlan, config: QuantConfig, feeds: list[dict],
                    progress=None, *, show_units: bool | None = None, stats: list | None = None) -> CalibrationArtifact:
    """Calibrator init (config.recon.init_method), then reconstruction of every unit. `stats`, if given, receives
    one loop.UnitStats per unit (time, steps/s, first and last loss)."""
    import torch

    from ...errors import InputError
    from ..baseline import calibrate_baseline
    from ...torchexec import OnnxModule
    from .loop import reconstruct

    if str(config.device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {config.device}: torch sees no CUDA device; use --device cpu")

    base_cfg = replace(config, method=config.recon.init_method)
    module = OnnxModule(model).to(config.device).eval()
    base = calibrate_baseline(model, plan, base_cfg, feeds, progress, module=module)
    del module
    units = find_units(model, plan)
    if show_units is None:
        show_units = progress is not None and not getattr(progress, "disable", False)
    result, _ = reconstruct(model, plan, base, config, feeds, units, progress=show_units)
    if stats is not None:
        stats.extend(result.units)
    result.artifact.check_names(model)
    return result.artifact
