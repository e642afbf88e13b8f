"""A user's --device as a torch device this machine has (cpu, cuda, cuda:N), checked before any long work."""
from __future__ import annotations

import torch

from ..errors import InputError


def torch_device(name: str | None, hint: str = "use --device cpu") -> torch.device:
    """torch.device(name or "cpu"), or InputError in one line: a name torch does not parse, a device type this
    project does not run on, no CUDA device visible, or a CUDA index past the last one."""
    try:
        dev = torch.device(name or "cpu")
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {name!r}: not a device; give cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: this project runs on cpu or cuda (cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: torch sees no CUDA device; {hint}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"--device {name}: torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return dev
