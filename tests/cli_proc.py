"""Run `carsam-onnx` as its own process, as a user does, and fast enough for tables of cases.

`python -m carsam_onnx` spends ~4 s importing torch before it looks at its arguments; a table of 40 bad
inputs would spend minutes on that alone. `CliRunner` therefore starts one *zygote* process that imports the
package once and, per command, forks a child: a separate process with its own stdin/stdout/stderr files, its
own exit status and its own signal handling, which runs `carsam_onnx/__main__.py` exactly as `python -m`
does (runpy, `sys.argv`), with a fresh copy of the interpreter state. What the interpreter itself does with an
uncaught exception (traceback on stderr, exit 1) and with `SystemExit` is reproduced. The child can drop to
an unprivileged user (uid/gid 65534) before it runs.

Set CARSAM_TEST_REAL_SUBPROCESS=1 to run every command as a fresh `sys.executable -m carsam_onnx` instead
(slow; the same assertions hold: tests/test_bad_inputs.py::test_zygote_matches_real_interpreter checks a
sample both ways on every run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534

_ZYGOTE = r'''
import json, os, runpy, sys, traceback
import carsam_onnx.cli  # noqa: F401  (the slow imports, once: what every command imports sooner or later)
import carsam_onnx.quantize, carsam_onnx.eval.runner, carsam_onnx.torchexec, carsam_onnx.data.synth  # noqa
import onnxruntime, pycocotools.coco, segment_anything.modeling  # noqa: F401
main_py = os.path.join(os.path.dirname(carsam_onnx.cli.__file__), "__main__.py")
reply = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush(); reply.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), 1)
            os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), 2)
            if req["uid"] is not None:
                os.setgroups([]); os.setgid(req["uid"]); os.setuid(req["uid"])
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            sys.argv = [main_py] + req["argv"]
            code = 0
            try:
                runpy.run_module("carsam_onnx", run_name="__main__", alter_sys=True)
            except SystemExit as e:      # as the interpreter handles it
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr); code = 1
            except BaseException:
                traceback.print_exc(); code = 1
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code & 0xFF)
    reply.write(json.dumps({"pid": pid}) + "\n"); reply.flush()
    _, status = os.waitpid(pid, 0)
    reply.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n"); reply.flush()
'''


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def err_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("COLUMNS", None)
    return env


def real_subprocess() -> bool:
    return os.environ.get("CARSAM_TEST_REAL_SUBPROCESS", "") not in ("", "0")


def run_real(argv: list[str], cwd: Path, uid: int | None = None, timeout: float = 300) -> Result:
    """A fresh `python -m carsam_onnx ARGV` (as uid/gid `uid` through setpriv when given)."""
    cmd = [sys.executable, "-m", "carsam_onnx", *argv]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return Result(p.returncode, p.stdout, p.stderr)


class CliRunner:
    """Forks `carsam-onnx` processes from a zygote that has imported the package (see the module docstring)."""

    def __init__(self):
        self._proc = None
        self._dir = Path(tempfile.mkdtemp(prefix="carsam-cli-"))
        os.chmod(self._dir, 0o777)     # an unprivileged child writes its stdout/stderr files here
        self._n = 0

    def _zygote(self):
        if self._proc is None:
            self._proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
        return self._proc

    def run(self, argv: list[str], cwd: Path, uid: int | None = None, env: dict | None = None) -> Result:
        if real_subprocess():
            return run_real(argv, cwd, uid)
        self._n += 1
        out, err = self._dir / f"{self._n}.out", self._dir / f"{self._n}.err"
        z = self._zygote()
        z.stdin.write(json.dumps({"argv": [str(a) for a in argv], "cwd": str(cwd), "uid": uid, "env": env or {},
                                  "stdout": str(out), "stderr": str(err)}) + "\n")
        z.stdin.flush()
        json.loads(z.stdout.readline())                      # {"pid": ...}
        line = z.stdout.readline()
        if not line:
            raise RuntimeError("the zygote process died")
        rc = json.loads(line)["rc"]
        return Result(rc, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self):
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
            self._proc = None
        for p in self._dir.iterdir():
            p.unlink()
        self._dir.rmdir()
