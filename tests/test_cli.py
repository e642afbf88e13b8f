"""CLI behaviour: exit codes, one-line errors, no partial files, inspect --json."""
from __future__ import annotations

import json
import os

import pytest
import torch

from carsam_onnx.cli import main
from carsam_onnx.export.models import ARCHS, build_sam_arch
from sam_models import sam_onnx_path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]


def test_export_refuses_without_weights_choice(capsys, tmp_path):
    code, _, err = run(capsys, "export", "--model-type", "vit_b", "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "--checkpoint", "--random-init")
    assert not list(tmp_path.iterdir())


def test_export_missing_and_unreadable_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "export", "--model-type", "vit_b", "--checkpoint", str(tmp_path / "nope.pth"),
                       "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "not found", "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    code, _, err = run(capsys, "export", "--model-type", "vit_b", "--checkpoint", str(bad), "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "cannot read checkpoint", "bad.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def test_export_checkpoint_of_other_model_type(capsys, tmp_path):
    # A state dict with SAM's keys but another architecture's shapes (the small reference arch, fp16 to keep it small).
    sd = {k: v.half() for k, v in build_sam_arch(ARCHS["reference"]).state_dict().items()}
    ckpt = tmp_path / "other.pth"
    torch.save(sd, ckpt)
    code, _, err = run(capsys, "export", "--model-type", "vit_b", "--checkpoint", str(ckpt), "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "does not fit --model-type vit_b", "wrong shape")
    assert not (tmp_path / "m.onnx").exists()


def test_export_unwritable_and_existing_output(capsys, tmp_path):
    code, _, err = run(capsys, "export", "--model-type", "vit_b", "--random-init", "-o", str(tmp_path / "no" / "m.onnx"))
    assert_one_line_error(code, err, "does not exist")
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "export", "--model-type", "vit_b", "--random-init", "-o", str(tmp_path / "file" / "m.onnx"))
    assert_one_line_error(code, err, "is a file, not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write a read-only folder (root): the check cannot be exercised")
        code, _, err = run(capsys, "export", "--model-type", "vit_b", "--random-init", "-o", str(ro / "m.onnx"))
        assert_one_line_error(code, err, "not writable")
    finally:
        os.chmod(ro, 0o700)


def test_existing_output_needs_force(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "export", "--model-type", "vit_b", "--random-init", "--split", "-o", str(out))
    assert_one_line_error(code, err, "exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    # the split outputs are checked too, before any work
    out.unlink()
    (tmp_path / "m.decoder.onnx").write_bytes(b"keep me too")
    code, _, err = run(capsys, "export", "--model-type", "vit_b", "--random-init", "--split", "-o", str(out))
    assert_one_line_error(code, err, "m.decoder.onnx", "exists")
    assert not out.exists()


def test_inspect_json_keys(capsys):
    path = sam_onnx_path("vit_b", "decoder", "dynamo")
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["opset"] == 21
    assert [i["name"] for i in info["inputs"]] == ["image_embeddings", "point_coords", "point_labels"]
    assert info["inputs"][1]["shape"][1] not in (2, "?")      # N is a named dynamic dimension
    assert info["op_counts"]["Softmax"] == 7
    assert 4_000_000 < info["num_parameters"] < 4_300_000  # SAM's mask decoder + prompt encoder
    assert "attention" in info


def test_inspect_rejects_non_onnx(capsys, tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    code, _, err = run(capsys, "inspect", str(bad))
    assert_one_line_error(code, err, "x.onnx")
    path = sam_onnx_path("vit_b", "decoder", "dynamo")
    trunc = tmp_path / "t.onnx"
    trunc.write_bytes(path.read_bytes()[: 100_000])
    code, _, err = run(capsys, "inspect", str(trunc))
    assert_one_line_error(code, err, "t.onnx")


def test_quantize_method_flags_reach_the_config(capsys, monkeypatch):
    """The CAR-SAM options of the CLI land in QuantConfig and quantize's keywords (MAC's scope and timing, the
    report's comparison run), and their defaults are config.py's."""
    from carsam_onnx import cli
    from carsam_onnx.config import MacConfig

    seen = []

    class Done:
        def lines(self):
            return []

    monkeypatch.setattr(cli.api, "quantize", lambda model, out, cfg, **kw: seen.append((cfg, kw)) or Done())
    assert main(["-q", "quantize", "m.onnx", "-o", "q.onnx", "--method", "carsam", "--mac-scope", "all",
                 "--mac-when", "decoder", "--mac-lambda", "100", "--mac-qk", "q", "--no-mac-v",
                 "--mac-granularity", "projection", "--report", "rep", "--report-compare", "earlier"]) == 0
    assert main(["-q", "quantize", "m.onnx", "-o", "q.onnx", "--method", "carsam"]) == 0
    (cfg, kw), (plain, plain_kw) = seen
    assert (cfg.mac.scope, cfg.mac.when, kw["report_dir"], kw["report_compare"]) == ("all", "decoder", "rep", "earlier")
    assert (cfg.mac.lam_rel, cfg.mac.qk, cfg.mac.v, cfg.mac.granularity) == (100.0, "q", False, "projection")
    assert plain.mac == MacConfig() and plain_kw["report_compare"] is None and plain_kw["report_images"] == 2


def test_top_level_help_says_what_the_tool_does_and_a_typical_run_parses(capsys):
    """`carsam-onnx --help` is for users (what the tool does, a typical run), and every command of its typical run
    is one the parser takes."""
    import shlex

    from carsam_onnx.cli import EPILOG, build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Post-training quantization of Segment Anything" in out and "a typical run:" in out
    runs = [line.split("#")[0].split() for line in EPILOG.splitlines() if line.strip().startswith("carsam-onnx ")]
    assert len(runs) == 4
    for argv in runs:
        args = build_parser().parse_args(shlex.split(" ".join(argv[1:])))
        assert args.command == argv[1]


def test_every_argument_of_every_command_says_what_it_is():
    """No option or positional shows up in `--help` without a line of its own."""
    import argparse

    from carsam_onnx.cli import build_parser

    def parsers(p, path):
        yield path, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    yield from parsers(sp, path + [name])

    silent = [(" ".join(path), a.option_strings or [a.dest]) for path, p in parsers(build_parser(), [])
              for a in p._actions if a.help is None and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    assert silent == []
