"""Calibration methods by name: the one list behind `--method` (choices and help) and the config check.

A method is a function (model, plan, config, feeds, progress) -> CalibrationArtifact; adding one is one
`register_method` call below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import QuantConfig
from ..errors import InputError
from .baseline import calibrate_baseline
from .recon import calibrate_carsam, calibrate_recon

CalibrateFn = Callable[..., "CalibrationArtifact"]  # noqa: F821 (artifact.CalibrationArtifact)


@dataclass(frozen=True)
class Method:
    name: str
    calibrate: CalibrateFn
    help: str
    stats: bool = False     # the function takes `stats=list` and appends one record per step of its work
    baseline: bool = False  # ... and `baseline=list`, to which it appends the calibrator artifact it started from
    log: bool = False       # ... and `log=progress.StageLog`, to which it reports its stages (and units)


METHODS: dict[str, Method] = {}


def register_method(name: str, calibrate: CalibrateFn, help: str, *, stats: bool = False,
                    baseline: bool = False, log: bool = False) -> None:
    """Make `--method NAME` available (`stats`, `baseline`, `log`: see Method)."""
    METHODS[name] = Method(name, calibrate, help, stats, baseline, log)


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"--method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def check_config(config: QuantConfig) -> Method:
    """The method `config` asks for (InputError naming the choices when there is none)."""
    return get_method(config.method)


def methods_help() -> str:
    return "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())


register_method("minmax", calibrate_baseline, "activation ranges from min/max, absmax weight scales")
register_method("percentile", calibrate_baseline, "activation ranges clipped at --percentile, absmax weight scales")
register_method("mse", calibrate_baseline, "activation and per-channel weight ranges searched for the least MSE")
register_method("recon", calibrate_recon, "block reconstruction (AdaRound weights, LSQ step sizes, QDrop) on top of "
                "--recon-init; see --recon-*", stats=True, baseline=True, log=True)
register_method("carsam", calibrate_carsam, "CAR-SAM: MAC (closed-form compensation of attention-operand error in the "
                "q/k/v projections) + reconstruction with JCAR's joint token<->image decoder units; "
                "--no-mac / --no-jcar ablate it", stats=True, baseline=True, log=True)
