"""Sessions over an ONNX model: ONNX Runtime (ort.py), the torch executor (torch_runtime.py), by name (registry.py)."""
from .base import Runtime, Session
from .ort import OrtRuntime, OrtSession
from .registry import RUNTIMES, get_runtime, register_runtime

__all__ = ["Runtime", "Session", "OrtRuntime", "OrtSession", "RUNTIMES", "get_runtime", "register_runtime"]
