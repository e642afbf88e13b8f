"""The steps per unit a reconstruction takes by default (ReconConfig.iters_for): the device's schedule, and on a CPU
twice the steps where weights and activations both have 3 bits or fewer (W3A3 had not converged at 200)."""
from __future__ import annotations

import onnx
import pytest
from tiny_sam import tiny_sam_paths

from carsam_onnx.calib.feeds import build_feeds
from carsam_onnx.calib.recon import calibrate_recon
from carsam_onnx.config import BitWidths, QuantConfig, ReconConfig
from carsam_onnx.passes.plan import plan_quantization
from carsam_onnx.quantize import calibration_samples

RC = ReconConfig()


@pytest.mark.parametrize("bits", [BitWidths(3, 3), BitWidths(2, 3), BitWidths(2, 2)])
def test_cpu_default_doubles_at_three_bits_or_fewer(bits):
    assert RC.iters_for("cpu", bits) == RC.cpu_iters_3bit == 2 * RC.cpu_iters


@pytest.mark.parametrize("bits", [BitWidths(4, 4), BitWidths(3, 4), BitWidths(4, 3), BitWidths(3, 16), None])
def test_cpu_default_keeps_its_steps_above_three_bits_or_without_bits(bits):
    assert RC.iters_for("cpu", bits) == RC.cpu_iters


@pytest.mark.parametrize("bits", [BitWidths(3, 3), BitWidths(4, 4)])
def test_gpu_schedule_and_an_explicit_count_do_not_depend_on_bits(bits):
    assert RC.iters_for("cuda", bits) == RC.gpu_iters
    assert ReconConfig(iters=7).iters_for("cpu", bits) == ReconConfig(iters=7).iters_for("cuda:0", bits) == 7


def test_a_w3a3_reconstruction_runs_and_records_the_three_bit_schedule():
    model = onnx.load(str(tiny_sam_paths()["full"]))
    cfg = QuantConfig(bits=BitWidths(3, 3), method="recon", num_calib=2,
                      recon=ReconConfig(cpu_iters=1, cpu_iters_3bit=2))
    plan = plan_quantization(model, cfg)
    with pytest.warns(UserWarning):
        calib, _ = calibration_samples(cfg, 128, None, None)
    stats: list = []
    art = calibrate_recon(model, plan, cfg, build_feeds(model, calib), stats=stats)
    assert art.info["recon_iters"] == "2"
    assert stats and {s.iters for s in stats} == {2}
