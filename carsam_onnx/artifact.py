"""Calibration results, keyed by ONNX names. No torch here: this is what calib/ hands to passes/.

- activations: value name -> per-tensor quantization (scale, zero point, bits, signedness)
- weights: float initializer name -> per-channel (or blocked) quantization, optionally with the chosen
  integer values (AdaRound-style rounding decided in calibration)
- float_weights: initializer name -> corrected float tensor (MAC / reconstruction changes the weight or bias
  itself); written into the graph before quantization

`save_artifact` / `load_artifact` store it with the config that made it and the sha256 of the FP model it
belongs to, so a calibration run on one machine can be emitted on another (`carsam-onnx emit`). The file is
an .npz read with allow_pickle=False: one JSON header (format, version, model hash, config, info, scalar
parameters) and the arrays (scales, integer values, corrected weights) under generated keys.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .config import QuantConfig, config_from_dict, config_to_dict
from .errors import ArtifactError, ModelError
from .modelio import atomic_write
from .qmath import ActivationQuant, WeightQuant

__all__ = ["ActivationQuant", "WeightQuant", "CalibrationArtifact", "SavedCalibration", "save_artifact",
           "load_artifact"]

FORMAT = "carsam-calibration"
FORMAT_VERSION = 1
_HEADER = "header"


@dataclass
class CalibrationArtifact:
    activations: dict[str, ActivationQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)   # method, bits, calibration set... -> model metadata

    def check_names(self, model: onnx.ModelProto) -> None:
        """Every key must name a value / initializer of `model`; fail listing the unknown ones."""
        inits = {t.name for t in model.graph.initializer}
        values = inits | {i.name for i in model.graph.input}
        for n in model.graph.node:
            values.update(o for o in n.output if o)
        unknown = sorted(k for k in self.activations if k not in values)
        unknown += sorted(k for k in (*self.weights, *self.float_weights) if k not in inits)
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise ModelError(f"calibration artifact names {len(unknown)} tensors not in the model: {shown}")


@dataclass(frozen=True)
class SavedCalibration:
    artifact: CalibrationArtifact
    config: QuantConfig
    model_sha256: str        # of the FP model file the artifact was computed on


def save_artifact(path: str | Path, artifact: CalibrationArtifact, config: QuantConfig, model_sha256: str,
                  force: bool = False) -> Path:
    """Write `artifact` with its config and model hash (atomically; see the module docstring)."""
    arrays: dict[str, np.ndarray] = {}

    def put(prefix: str, value) -> str:
        key = f"{prefix}{len(arrays)}"
        arrays[key] = np.asarray(value)
        return key

    weights = {}
    for name, wq in artifact.weights.items():
        weights[name] = {"axis": int(wq.axis), "bits": int(wq.bits), "block_size": wq.block_size,
                         "scale": put("s", np.asarray(wq.scale, dtype=np.float32)),
                         "values": None if wq.values is None else put("v", np.asarray(wq.values, dtype=np.int8))}
    header = {"format": FORMAT, "version": FORMAT_VERSION, "model_sha256": model_sha256,
              "config": config_to_dict(config), "info": dict(artifact.info),
              "activations": {k: {"scale": float(a.scale), "zero_point": int(a.zero_point), "bits": int(a.bits),
                                  "signed": bool(a.signed)} for k, a in artifact.activations.items()},
              "weights": weights,
              "float_weights": {k: put("f", v) for k, v in artifact.float_weights.items()}}
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write(path, buf.getvalue(), force=force)


def load_artifact(path: str | Path) -> SavedCalibration:
    """Read a file written by save_artifact; ArtifactError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"calibration file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z[_HEADER]).decode())
            if header.get("format") != FORMAT:
                raise ArtifactError(f"{path} is not a carsam-onnx calibration file")
            if header.get("version") != FORMAT_VERSION:
                raise ArtifactError(f"{path} has calibration format version {header.get('version')}; this "
                                    f"carsam-onnx reads version {FORMAT_VERSION} (calibrate again)")
            art = CalibrationArtifact(info={str(k): str(v) for k, v in header["info"].items()})
            for k, a in header["activations"].items():
                art.activations[k] = ActivationQuant(float(a["scale"]), int(a["zero_point"]), int(a["bits"]),
                                                     bool(a["signed"]))
            for k, w in header["weights"].items():
                art.weights[k] = WeightQuant(scale=z[w["scale"]], axis=int(w["axis"]), bits=int(w["bits"]),
                                             block_size=w["block_size"],
                                             values=None if w["values"] is None else z[w["values"]])
            art.float_weights = {k: z[key] for k, key in header["float_weights"].items()}
            config = config_from_dict(QuantConfig, header["config"])
            sha = str(header["model_sha256"])
    except ArtifactError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path} is not a readable carsam-onnx calibration file ({type(e).__name__})") from None
    return SavedCalibration(art, config, sha)
