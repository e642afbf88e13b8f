"""Issue 9: encoder and decoder latency of a full SAM ONNX model under a user's default ONNX Runtime session.

    python tools/int8_format_latency.py MODEL.onnx [MODEL2.onnx ...] [--runs 10] [--threads 1]

The model is split (samgraph.py) into its image part and its prompt part; each runs `--runs` times after one
warm-up, single-threaded by default. Prints one JSON line per model: median wall and median process CPU time per
run (CPU time is the steadier figure on a shared machine), with the CPU's flags. Native CPUs only: under an
emulator the figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx


def _time(sess, feed, runs):
    sess.run(None, feed)
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        sess.run(None, feed)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return round(statistics.median(wall) * 1e3, 1), round(statistics.median(cpu) * 1e3, 1)


def main() -> None:
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_session_kinds import cpu_flags
    from carsam_onnx.samgraph import split_full_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    for path in a.models:
        model = onnx.load(path)
        enc, dec, boundary = split_full_model(model)
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        es = ort.InferenceSession(enc.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ds = ort.InferenceSession(dec.SerializeToString(), so, providers=["CPUExecutionProvider"])
        img = next(i for i in es.get_inputs() if i.name == "image")
        size = [d if isinstance(d, int) else 1 for d in img.shape]
        image = np.random.default_rng(0).uniform(-2, 2, size=size).astype(np.float32)
        embs = dict(zip([o.name for o in es.get_outputs()], es.run(None, {"image": image})))
        s = size[-1]
        feed = {**{k: v for k, v in embs.items() if k in {i.name for i in ds.get_inputs()}},
                "point_coords": np.array([[[0.2 * s, 0.3 * s], [0.7 * s, 0.8 * s]]], np.float32),
                "point_labels": np.array([[2.0, 3.0]], np.float32)}
        e_wall, e_cpu = _time(es, {"image": image}, a.runs)
        d_wall, d_cpu = _time(ds, feed, a.runs)
        print(json.dumps({"model": path, "threads": a.threads, "runs": a.runs, "encoder_ms_wall": e_wall,
                          "encoder_ms_cpu": e_cpu, "decoder_ms_wall": d_wall, "decoder_ms_cpu": d_cpu,
                          "cpu_flags": cpu_flags()}), flush=True)


if __name__ == "__main__":
    main()
