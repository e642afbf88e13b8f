"""Every `carsam-onnx ...` command line in README.md parses with the real CLI (no stale flags or choices)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from carsam_onnx.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split("#")[0].strip() for b in blocks for line in b.splitlines()]
    return [line for line in lines if line.startswith("carsam-onnx ")]


def test_readme_has_examples():
    cmds = readme_commands()
    assert {c.split()[1] for c in cmds} >= {"export", "inspect", "quantize", "emit", "eval", "data"}


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    args = build_parser().parse_args(shlex.split(line)[1:])   # argparse exits (SystemExit) on a stale flag
    assert callable(args.run)
