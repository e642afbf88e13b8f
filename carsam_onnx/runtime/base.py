"""What every runtime provides: a `Runtime` turns an ONNX model into a `Session` (named numpy in, named numpy out)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import onnx


class Session(ABC):
    """One loaded model: named numpy arrays in, named numpy arrays out."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...

    def run_many(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Several independent runs (all prompts of one image). Override to batch them."""
        return [self.run(f) for f in feeds]


class Runtime(ABC):
    name: str

    @abstractmethod
    def session(self, model: onnx.ModelProto | Path, what: str) -> Session:
        """Load `model` (a ModelProto, or a path to load from, external data included)."""
