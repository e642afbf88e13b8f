"""The calibration set's memory check: refused before any image is made or read, by the numbers it names."""
from __future__ import annotations

import pytest

from carsam_onnx.data import builtin, memory, prompts
from carsam_onnx.errors import CalibrationError


def _meminfo(tmp_path, monkeypatch, kib: int | None, cgroup: tuple[str, int] | None = None):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:  99999999 kB\n" + (f"MemAvailable:  {kib} kB\n" if kib is not None else ""))
    monkeypatch.setattr(memory, "MEMINFO", f)
    cg = tmp_path / "cgroup"
    cg.mkdir(exist_ok=True)
    for name in ("memory.max", "memory.current"):
        (cg / name).unlink(missing_ok=True)
    if cgroup is not None:
        (cg / "memory.max").write_text(cgroup[0] + "\n")
        (cg / "memory.current").write_text(f"{cgroup[1]}\n")
    monkeypatch.setattr(memory, "CGROUP", cg)


def test_available_bytes_reads_memavailable(tmp_path, monkeypatch):
    _meminfo(tmp_path, monkeypatch, 2048)
    assert memory.available_bytes() == 2048 * 1024


def test_no_memavailable_means_no_check(tmp_path, monkeypatch):
    _meminfo(tmp_path, monkeypatch, None)
    assert memory.available_bytes() is None
    memory.check_images_fit(10**9, 1024)             # nothing to compare with: not refused


def test_a_containers_lower_limit_counts(tmp_path, monkeypatch):
    _meminfo(tmp_path, monkeypatch, 2048, cgroup=("1048576", 524288))        # 1 MiB limit, half used
    assert memory.available_bytes() == 524288
    _meminfo(tmp_path, monkeypatch, 2048, cgroup=("max", 524288))            # no limit: the host's figure
    assert memory.available_bytes() == 2048 * 1024
    _meminfo(tmp_path, monkeypatch, None, cgroup=("1048576", 2 * 1048576))   # over the limit already: nothing
    assert memory.available_bytes() == 0


def test_half_of_the_available_memory_is_the_bound(tmp_path, monkeypatch):
    one = memory.image_bytes(1, 64)                  # 48 KiB
    _meminfo(tmp_path, monkeypatch, 2 * 10 * one // 1024)
    memory.check_images_fit(10, 64)                  # exactly half: accepted
    with pytest.raises(CalibrationError, match=r"--num-calib 9: 11 images of 64 px .* more than half"):
        memory.check_images_fit(11, 64, asked=9)


def test_builtin_set_refused_before_any_image_is_made(tmp_path, monkeypatch):
    _meminfo(tmp_path, monkeypatch, 1024)
    monkeypatch.setattr(builtin, "write_synthetic_coco", lambda *a, **k: pytest.fail("images were made"))
    with pytest.raises(CalibrationError, match="--num-calib 100"):
        builtin.builtin_calibration_set(100, 0, 256, warn=False)


def test_folder_counts_only_the_images_it_has(tmp_path, monkeypatch):
    from carsam_onnx.data.synth import write_synthetic_coco
    write_synthetic_coco(tmp_path / "set", 2, 5, image_size=64)
    _meminfo(tmp_path, monkeypatch, 4 * memory.image_bytes(2, 64) // 1024)
    with pytest.warns(UserWarning, match="using all of them"):
        assert len(prompts.load_calibration_set(tmp_path / "set", None, 10**6, 0, 64)) == 2
    _meminfo(tmp_path, monkeypatch, 1)
    monkeypatch.setattr(prompts, "_read_calib_image", lambda p: pytest.fail("an image was read"))
    with pytest.raises(CalibrationError, match="--num-calib 10: 2 images"):
        prompts.load_calibration_set(tmp_path / "set", None, 12, 0, 64, asked=10)
