"""SIGINT and SIGTERM in the middle of export, quantize and eval (issue 14, item 2): exit 130 / 143 after one
line on stderr (no traceback), no output and no temporary file left (in the output folder and in TMPDIR).

Each command runs as a fresh `python -m carsam_onnx -q ...` with its own TMPDIR. The signal is sent once the
process is provably inside the command, found from a marker rather than a delay:
- export: segment-anything (hence torchvision's shared library) is loaded only when the model is built;
- quantize: the built-in calibration set is written to a `carsam-calib-*` folder in TMPDIR and removed once
  it is read; the signal goes after that folder is gone, i.e. while feeds are built and calibration runs;
- eval: ONNX Runtime's library is loaded only when the model's sessions are created, before the image loop.
The workloads (the reference model's export, 48 calibration images, 60 evaluation images) last many seconds
past their marker, and a test that finds the process already finished says so instead of passing.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_proc import _env
from tiny_sam import tiny_sam_paths

MARKER_TIMEOUT_S = 240


def _maps_contain(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _wait(cond, proc, what: str, timeout: float = MARKER_TIMEOUT_S) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"no sign of {what} within {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    from carsam_onnx.data.synth import write_synthetic_coco

    root = tmp_path_factory.mktemp("interrupt") / "set"
    write_synthetic_coco(root, 60, seed=5, image_size=128)
    return root


def _start(argv: list[str], tmp: Path) -> subprocess.Popen:
    env = _env()
    env["TMPDIR"] = str(tmp)
    # SIGINT at its default, as under a terminal: a shell that starts pytest in the background (`&`) has its
    # children ignore SIGINT, and the CLI rightly keeps an ignored signal ignored (nohup).
    return subprocess.Popen([sys.executable, "-m", "carsam_onnx", "-q", *argv], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(signal.SIGTERM, 143, id="SIGTERM")]


@pytest.mark.parametrize("command", ["export", "quantize", "eval"])
@pytest.mark.parametrize("sig,code", SIGNALS)
def test_interrupted_command_leaves_nothing(command, sig, code, tmp_path, eval_set):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    if command == "export":
        proc = _start(["export", "--model-type", "reference", "-o", str(out / "ref.onnx"), "--split"], tmp)
        _wait(lambda: _maps_contain(proc.pid, "torchvision"), proc, "the model being built")
        time.sleep(1.0)                       # into building / exporting (tens of seconds of work left)
    elif command == "quantize":
        proc = _start(["quantize", str(tiny_sam_paths()["full"]), "-o", str(out / "q.onnx"), "--num-calib", "48",
                       "--method", "mse"], tmp)
        calib = lambda: any(p.name.startswith("carsam-calib-") for p in tmp.iterdir())  # noqa: E731
        _wait(calib, proc, "the calibration set being written")
        _wait(lambda: not calib(), proc, "the calibration set being read")
        time.sleep(0.5)                       # building feeds / calibrating
    else:
        proc = _start(["eval", str(tiny_sam_paths()["full"]), "--dataset", str(eval_set), "--json",
                       str(out / "m.json")], tmp)
        _wait(lambda: _maps_contain(proc.pid, "onnxruntime"), proc, "the model being loaded")
        time.sleep(0.5)                       # into the image loop
    if proc.poll() is not None:
        pytest.fail(f"{command} finished (rc {proc.returncode}) before the signal; the workload is too small")
    proc.send_signal(sig)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{command} did not stop within 120 s of {sig.name}")
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == code, (proc.returncode, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == [f"carsam-onnx {command}: interrupted by {sig.name}; nothing half-written was left"], stderr
    assert sorted(out.iterdir()) == [], "an output or a temporary file was left in the output folder"
    # `import onnxruntime` itself writes TMPDIR/.ses (a 51-byte session id it keeps): not a file of ours
    assert sorted(p.name for p in tmp.iterdir() if p.name != ".ses") == [], "a temporary file was left in TMPDIR"
