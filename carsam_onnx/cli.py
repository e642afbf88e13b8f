"""carsam-onnx command line: parse arguments -> config -> api call. No logic here."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from . import api
from .config import ExportConfig
from .errors import CarsamError


def _default(cls, name):
    return next(f.default for f in fields(cls) if f.name == name)


def _add_export(sub):
    p = sub.add_parser("export", help="build SAM with segment-anything and write ONNX (opset 21)")
    p.add_argument("--model-type", required=True, help="vit_b | vit_l | vit_h | reference (the bundled trained model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="official sam_vit_*.pth state dict")
    src.add_argument("--random-init", action="store_true", help="random weights (no checkpoint), seeded by --seed")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (full model)")
    p.add_argument("--split", action="store_true", help="also write OUT.encoder.onnx and OUT.decoder.onnx")
    p.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=_default(ExportConfig, "multimask"),
                   help="3 masks per prompt instead of 1")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default=_default(ExportConfig, "exporter"))
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(run=_run_export)


def _run_export(a) -> int:
    cfg = ExportConfig(model_type=a.model_type, checkpoint=a.checkpoint, seed=a.seed if a.random_init else None,
                       exporter=a.exporter, multimask=a.multimask, split=a.split, force=a.force)
    written = api.export(a.output, cfg)
    if not a.quiet:
        for part, path in written.items():
            print(f"wrote {part}: {path}")
    return 0


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="describe an ONNX model: I/O, opset, ops, parameters, attention sites")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(run=_run_inspect)


def _run_inspect(a) -> int:
    from .summary import format_summary

    info = api.inspect(a.model)
    print(json.dumps(info, indent=2) if a.json else format_summary(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carsam-onnx", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_export, _add_inspect):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CarsamError as e:
        print(f"carsam-onnx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
