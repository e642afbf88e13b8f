"""Where a reconstruction step spends its time, by unit role (issue 11's vit_b cost).

    python tools/profile_recon_units.py MODEL.onnx [--bits w4a4] [--num-calib 32] [--device cuda]
        [--steps 60] [--roles encoder_global encoder_window ...] [--tf32] [--batch N] [--torch-quantizers]
        [--profile-steps 5] [--captures]

For the first unit of each role (encoder_window, encoder_global, encoder_mlp, decoder_t2i, ...; or of each
role named in --roles) this reconstructs the unit alone, as
`quantize --method recon` would (the calibrator's quantizers everywhere else), for --steps steps, and prints
the steps per second of the whole unit (capture of its inputs, the steps, the unit guard: what the per-unit
line of `quantize` reports) and of the steps alone. With --profile-steps K it then runs K eager steps under the
torch profiler and prints the kernels that take the most device time. With --captures it instead times the
captures of every unit's inputs, in graph order, resumed where the previous one stopped and from the image.
Nothing is written.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from carsam_onnx.config import BitWidths, QuantConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--num-calib", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--roles", nargs="+", help="unit roles to run, e.g. encoder_global encoder_mlp (default: all)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions while reconstructing")
    ap.add_argument("--batch", type=int, help="calibration images per step (default: the device's schedule)")
    ap.add_argument("--torch-quantizers", action="store_true",
                    help="run the LSQ + QDrop quantizers as torch ops on a GPU too (default there: Triton kernels)")
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--captures", action="store_true",
                    help="instead: time the captures of every unit in order, resumed (stream cut) and from the image")
    args = ap.parse_args(argv)

    import torch

    from carsam_onnx.calib.baseline import calibrate_baseline
    from carsam_onnx.calib.feeds import build_feeds, image_size
    from carsam_onnx.calib.recon import find_units
    from carsam_onnx.calib.recon.loop import Reconstructor
    from carsam_onnx.modelio import load_model
    from carsam_onnx.quantize import _plan, calibration_samples
    from carsam_onnx.torchexec import OnnxModule, fakequant

    fakequant.FUSED_ON_CUDA = not args.torch_quantizers
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    config = QuantConfig(method="recon", bits=BitWidths.parse(args.bits), device=args.device,
                         num_calib=args.num_calib)
    rc = config.recon
    if args.batch:
        config = replace(config, recon=replace(rc, batch_size=args.batch))
    model, plan, _ = _plan(load_model(args.model), config)
    calib, _ = calibration_samples(config, image_size(model), None, None)
    feeds = build_feeds(model, calib, None, None, mask_refinement=config.calib_mask_input)
    t0 = time.perf_counter()
    module = OnnxModule(model).to(config.device).eval()
    base = calibrate_baseline(model, plan, replace(config, method=rc.init_method), feeds, None, module=module)
    del module
    print(f"{rc.init_method} initialisation {time.perf_counter() - t0:.1f} s", flush=True)
    units = find_units(model, plan)
    if args.captures:
        return time_captures(model, plan, base, config, units, feeds)
    first: dict[str, object] = {}
    for u in units:
        first.setdefault(u.role, u)
    chosen = [first[k] for k in (args.roles or list(first)) if k in first]
    r = Reconstructor(model, plan, base, config, units)
    gen = torch.Generator().manual_seed(config.seed)
    print(f"{'unit':28s} {'kind':10s} {'steps':>6s} {'unit s':>8s} {'unit steps/s':>13s} {'steps/s':>8s}  mode")
    for u in chosen:
        sync(config.device)
        t = time.perf_counter()
        q_in, *_ = r.capture(u, feeds)
        sync(config.device)
        capture = time.perf_counter() - t
        del q_in
        st = r.reconstruct(u, feeds, args.steps, False, gen)
        steps_only = args.steps / max(st.seconds - capture, 1e-9)
        print(f"{u.name:28s} {u.kind:10s} {args.steps:6d} {st.seconds:8.1f} {st.steps_per_second:13.1f} "
              f"{steps_only:8.1f}  {st.step_mode}", flush=True)
        r.done_acts.difference_update(u.activations)   # the next unit sees this one's quantizers as they started
        r.done_weights.difference_update(u.weights)
    if args.profile_steps:
        profile(r, chosen, feeds, args, config, gen)
    return 0


def time_captures(model, plan, base, config, units, feeds) -> int:
    """Every unit's capture in graph order (each unit then counted as finished, without learning), with the
    captures resumed at the previous frontier (the default) and run from the image."""
    from carsam_onnx.calib.recon.loop import Reconstructor

    for stream_cut in (True, False):
        cfg = replace(config, recon=replace(config.recon, stream_cut=stream_cut))
        r = Reconstructor(model, plan, base, cfg, units)
        sync(config.device)
        t = time.perf_counter()
        for u in units:
            r.capture(u, feeds)
            r.done_acts.update(u.activations)
            r.done_weights.update(u.weights)
        sync(config.device)
        print(f"captures of {len(units)} units x {len(feeds)} images, "
              f"{'resumed at the frontier' if stream_cut else 'from the image'}: {time.perf_counter() - t:.1f} s",
              flush=True)
    return 0


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def profile(r, chosen, feeds, args, config, gen) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile

    r.rc = replace(r.rc, cuda_graphs=False)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(config.device).startswith("cuda") else [])
    for u in chosen:
        r.reconstruct(u, feeds, 2, False, gen)   # warm-up (allocator, executor plans)
        with tprofile(activities=acts) as prof:
            r.reconstruct(u, feeds, args.profile_steps, False, gen)
            sync(config.device)
        key = "self_cuda_time_total" if len(acts) > 1 else "self_cpu_time_total"
        print(f"\n== {u.name} ({u.kind}): {args.profile_steps} eager steps (with capture and guard)")
        print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
