"""Runtimes by name (`--runtime NAME`): "ort" (ONNX Runtime) and "torch" (the project's torch executor on
--device cpu or cuda); `register_runtime` adds others."""
from __future__ import annotations

from typing import Callable

from ..errors import InputError
from .base import Runtime
from .ort import OrtRuntime


def _ort_runtime(device: str | None = None) -> Runtime:
    if device and device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(f"--device {device} with --runtime ort needs onnxruntime-gpu; "
                             "or use --runtime torch --device cuda")
        return OrtRuntime(["CUDAExecutionProvider", "CPUExecutionProvider"])
    if device not in (None, "cpu"):
        raise InputError(f"--device {device}: --runtime ort takes cpu or cuda")
    return OrtRuntime()


def _torch_runtime(device: str | None = None) -> Runtime:
    from .torch_runtime import TorchRuntime  # imports the torch executor only when asked for

    return TorchRuntime(device)


RUNTIMES: dict[str, Callable[..., Runtime]] = {"ort": _ort_runtime, "torch": _torch_runtime}


def register_runtime(name: str, factory: Callable[..., Runtime]) -> None:
    """Make `--runtime NAME` available; factory(device=...) -> Runtime."""
    RUNTIMES[name] = factory


def get_runtime(runtime: str | Runtime, device: str | None = None, provider: str | None = None) -> Runtime:
    """A Runtime by name; `provider` (cpu | cuda | tensorrt) picks ONNX Runtime's execution provider."""
    if provider is not None:
        from .providers import ort_runtime_for

        return ort_runtime_for(provider, runtime, device)
    if isinstance(runtime, Runtime):
        return runtime
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime!r} is not available; choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime](device=device)


