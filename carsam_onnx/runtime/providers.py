"""`--provider cpu|cuda|tensorrt`: ONNX Runtime execution providers, checked before any model is loaded.

Each provider falls back to the ones after it for the nodes it does not take (TensorRT -> CUDA -> CPU), as ONNX
Runtime does with a provider list. An unavailable provider is an InputError (one line, exit 2) naming the
package that brings it.
"""
from __future__ import annotations

from ..errors import InputError

PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
HINTS = {
    "cuda": "install onnxruntime-gpu (pip install -c constraints.txt -e '.[gpu]') on a machine with CUDA",
    "tensorrt": "install onnxruntime-gpu and NVIDIA TensorRT's libraries on a machine with an NVIDIA GPU",
}


def ort_providers(provider: str) -> list[str]:
    """Provider name -> ONNX Runtime provider list; InputError when it is unknown or not available here."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise InputError(f"--provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise InputError(f"--provider {provider}: ONNX Runtime here has no {wanted[0]} (available: "
                         f"{', '.join(available)}); {HINTS.get(provider, '')}".rstrip("; "))
    return [p for p in wanted if p in available]


def ort_runtime_for(provider: str, runtime="ort", device: str | None = None, threads: int | None = None):
    """An OrtRuntime on `provider`; `--provider` applies to ONNX Runtime only."""
    from .ort import OrtRuntime

    if not (runtime == "ort" or isinstance(runtime, OrtRuntime)):
        raise InputError(f"--provider {provider} applies to --runtime ort (ONNX Runtime), not {runtime}")
    if device not in (None, "cpu") and provider == "cpu" or (device or "").startswith("cuda") and provider == "cpu":
        raise InputError(f"--device {device} contradicts --provider cpu")
    return OrtRuntime(ort_providers(provider), threads=threads)
