"""Segm mAP of a SAM ONNX model under different ONNX Runtime session settings (issue 9).

    python tools/eval_session_kinds.py MODEL.onnx --dataset val --session default [--limit N]

--session default: `onnxruntime.InferenceSession(path)` exactly as a user's code opens it (CPU provider, no
options); project: the project's OrtRuntime (what `carsam-onnx eval` uses); disable_all: ORT_DISABLE_ALL (the
Q/DQ graph computed as written); basic: ORT_ENABLE_BASIC. Prints one JSON line with the metrics and the CPU flags.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from carsam_onnx.eval.runner import evaluate
from carsam_onnx.runtime import OrtRuntime, OrtSession
from carsam_onnx.errors import first_line
from carsam_onnx.errors import ModelError


def cpu_flags() -> str:
    from carsam_onnx.runtime.ort_settings import host_isa_flags

    return host_isa_flags()


class LevelRuntime(OrtRuntime):
    """A plain session: no config entries, no disabled optimizers; `level` None = ORT's default."""

    def __init__(self, level: str | None):
        super().__init__()
        self.level = level
        self.name = f"ort-{level or 'default'}"

    def session(self, model, what):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.level:
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, self.level)
        src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
        try:
            return OrtSession(ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]))
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load the {what}: {first_line(e)}") from None


SESSIONS = {"default": lambda: LevelRuntime(None), "project": OrtRuntime,
            "disable_all": lambda: LevelRuntime("ORT_DISABLE_ALL"), "basic": lambda: LevelRuntime("ORT_ENABLE_BASIC")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--dataset", required=True)
    p.add_argument("--session", choices=list(SESSIONS), default="default")
    p.add_argument("--limit", type=int)
    a = p.parse_args()
    t = time.time()
    r = evaluate(a.model, a.dataset, limit=a.limit, runtime=SESSIONS[a.session](), progress=False)
    print(json.dumps({"model": a.model, "session": a.session, "segm_mAP": r.segm_mAP, "mIoU": r.mIoU,
                      "images": r.num_images, "instances": r.num_instances, "cpu_flags": cpu_flags(),
                      "seconds": round(time.time() - t, 1)}))


if __name__ == "__main__":
    main()
