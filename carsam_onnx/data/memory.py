"""Refuse a calibration set that cannot fit in memory, before any image is made or read.

Calibration keeps every preprocessed image in memory (float32, 3 x size x size), and the calibrators and
reconstruction keep activations of the same order beside them, so a set whose images alone would take more than
half of the memory available now is refused with one line instead of being built until the process is killed.
Reconstruction caches each unit's inputs and targets for every image on the host (on the CPU, or a GPU's caches
that do not fit it): measured on the first image, a cache that cannot fit is refused the same way before it grows.
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


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_images_fit(count: int, image_size: int, asked: int | None = None) -> None:
    """CalibrationError when `count` images of `image_size` px take more than half of the available memory.
    `asked`: the --num-calib the user gave, when `count` also holds the held-out images."""
    have = available_bytes()
    need = image_bytes(count, image_size)
    if have is not None and need > have // 2:
        raise CalibrationError(f"--num-calib {asked or count}: {count} images of {image_size} px take {_size(need)} in "
                               f"memory, more than half of the {_size(have)} available; use fewer")


CACHE_SHARE = 0.9    # of the memory available: what a reconstruction unit's remaining cached activations may take


def check_cache_fits(what: str, per_image: int, remaining: int, count: int) -> None:
    """CalibrationError when `remaining` more images' cached activations of `per_image` bytes each would take more
    than CACHE_SHARE of the host memory available now (what is cached already is counted as used). `what`
    names the cache (a reconstruction unit) and `count` is the calibration set's size, for the message."""
    have = available_bytes()
    need = per_image * remaining
    if have is not None and need > CACHE_SHARE * have:
        raise CalibrationError(f"{what}: the cached activations of {count} calibration images take about "
                               f"{_size(per_image * count)} in memory ({_size(per_image)} an image), more than the "
                               f"{_size(have)} available; use fewer --num-calib")

