"""Runtimes by name (`--runtime NAME`): "ort" (ONNX Runtime) and "torch" (the project's torch executor on
--device cpu or cuda); `register_runtime` adds others."""
from __future__ import annotations

import inspect
from typing import Callable

from ..errors import InputError
from .base import Runtime
from .ort import OrtRuntime


def _ort_runtime(device: str | None = None, threads: int | None = None) -> Runtime:
    if device and device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(f"--device {device} with --runtime ort needs onnxruntime-gpu; "
                             "or use --runtime torch --device cuda")
        return OrtRuntime(["CUDAExecutionProvider", "CPUExecutionProvider"], threads=threads)
    if device not in (None, "cpu"):
        raise InputError(f"--device {device}: --runtime ort takes cpu or cuda")
    return OrtRuntime(threads=threads)


def _torch_runtime(device: str | None = None, threads: int | None = None) -> Runtime:
    from .torch_runtime import TorchRuntime  # imports the torch executor only when asked for

    return TorchRuntime(device, threads=threads)


RUNTIMES: dict[str, Callable[..., Runtime]] = {"ort": _ort_runtime, "torch": _torch_runtime}


def register_runtime(name: str, factory: Callable[..., Runtime]) -> None:
    """Make `--runtime NAME` available; factory(device=...) -> Runtime, and factory(device=..., threads=N) where
    it supports `--threads`."""
    RUNTIMES[name] = factory


def get_runtime(runtime: str | Runtime, device: str | None = None, provider: str | None = None,
                threads: int | None = None) -> Runtime:
    """A Runtime by name; `provider` (cpu | cuda | tensorrt) picks ONNX Runtime's execution provider; `threads`
    its CPU threads (None: the runtime's default). A Runtime object is returned as it is."""
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: must be >= 1")
    if provider is not None:
        from .providers import ort_runtime_for

        return ort_runtime_for(provider, runtime, device, threads)
    if isinstance(runtime, Runtime):
        return runtime
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime!r} is not available; choose one of {', '.join(RUNTIMES)}")
    factory = RUNTIMES[runtime]
    if threads is None:
        return factory(device=device)
    if "threads" not in inspect.signature(factory).parameters:
        raise InputError(f"--threads {threads}: --runtime {runtime} does not take a thread count")
    return factory(device=device, threads=threads)


