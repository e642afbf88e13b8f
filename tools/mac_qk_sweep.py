"""Held-out Q.K^T relative error per decoder attention site, before and after MAC, for a few MAC settings.

    python tools/mac_qk_sweep.py --decoder ref.decoder.onnx --encoder ref.encoder.onnx --bits w4a4 \
        --method mse --num-calib 8 --num-heldout 4 "lam_rel=1" "lam_rel=10,v=False"

Calibration images: the built-in set (seed 1); held-out images: validation seed 2 (the same generator as
`carsam-onnx data synth --seed 2`). Decoder-only model on FP encoder embeddings (ONNX Runtime). Each
positional argument is a MacConfig keyword list. Prints one line per setting: the site errors in graph order
and their sum.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from carsam_onnx.calib import mac as ms
    from carsam_onnx.calib.baseline import calibrate_baseline
    from carsam_onnx.calib.feeds import build_feeds
    from carsam_onnx.config import BitWidths, MacConfig, QuantConfig
    from carsam_onnx.data.builtin import VALIDATION_SEED, builtin_calibration_set
    from carsam_onnx.modelio import load_model
    from carsam_onnx.passes.plan import plan_quantization

    ap = argparse.ArgumentParser()
    ap.add_argument("--decoder", required=True)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--method", default="mse")
    ap.add_argument("--num-calib", type=int, default=8)
    ap.add_argument("--num-heldout", type=int, default=4)
    ap.add_argument("settings", nargs="*", default=["lam_rel=10"])
    a = ap.parse_args()
    t0 = time.time()
    model = load_model(a.decoder)
    calib = build_feeds(model, builtin_calibration_set(a.num_calib, 0, 256, warn=False), encoder=a.encoder)
    held = build_feeds(model, builtin_calibration_set(a.num_heldout, 0, 256, data_seed=VALIDATION_SEED, warn=False),
                       encoder=a.encoder)
    config = QuantConfig(bits=BitWidths.parse(a.bits), method=a.method)
    plan = plan_quantization(model, config)
    art = calibrate_baseline(model, plan, config, calib)
    sites = [s for s in plan.attention if s.role in ms.DECODER_ROLES]
    print("sites:", ", ".join(f"{s.role.value}:{s.block}" for s in sites))

    def show(name, err):
        vals = [err[s.qk_matmul] for s in sites]
        print(f"{name:32s}", " ".join(f"{v:.4f}" for v in vals), f"sum {sum(vals):.4f}",
              f"({time.time() - t0:.0f} s)", flush=True)
    show("baseline", ms.qk_error(model, plan, art, held, sites=sites))
    for spec in a.settings:
        kw = eval(f"dict({spec})")   # a command-line keyword list, e.g. lam_rel=1,v=False
        fw, _ = ms.mac_sites(model, plan, art, calib, MacConfig(**kw))
        show(spec, ms.qk_error(model, plan, art, held, fw, sites=sites))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
