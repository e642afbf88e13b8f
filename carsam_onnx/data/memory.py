"""Refuse a calibration set that cannot fit in memory, before any image is made or read.

Calibration keeps every preprocessed image in memory (float32, 3 x size x size), and the calibrators and
reconstruction keep activations of the same order beside them, so a set whose images alone would take more than
half of the memory available now is refused with one line instead of being built until the process is killed.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CalibrationError

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")       # cgroup v2: a container's own limit (MemAvailable is the host's)


def _meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int((CGROUP / "memory.current").read_text().strip()), 0)
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """The memory available to a new allocation now: Linux MemAvailable, or less where this process's cgroup
    (a container) has a lower limit; None where neither can be read."""
    known = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return min(known) if known else None


def image_bytes(count: int, image_size: int) -> int:
    """Bytes of `count` preprocessed images of a model with input `image_size` (float32, 3 channels)."""
    return count * 3 * image_size * image_size * 4


def check_images_fit(count: int, image_size: int, asked: int | None = None) -> None:
    """CalibrationError when `count` images of `image_size` px take more than half of the available memory.
    `asked`: the --num-calib the user gave, when `count` also holds the held-out images."""
    have = available_bytes()
    need = image_bytes(count, image_size)
    if have is not None and need > have // 2:
        raise CalibrationError(f"--num-calib {asked or count}: {count} images of {image_size} px take {need / 2**30:.1f} GiB in "
                               f"memory, more than half of the {have / 2**30:.1f} GiB available; use fewer")
