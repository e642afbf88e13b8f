"""Issue 9: the default W8A8 format cannot saturate ONNX Runtime's x86 integer kernels, on any host.

On x86 CPUs without VNNI, ONNX Runtime's U8S8 GEMM / convolution kernels multiply uint8 activations by int8
weights with VPMADDUBSW, which adds adjacent pairs of products into a saturating int16
(docs/quantization_format.md). This test emulates that instruction in numpy over the integers a default W8A8
emission writes and the whole uint8 activation grid [0, 255] (ONNX Runtime runs INT8 activations of
`--target trt` as UINT8 + 128, so the grid is the same), so it holds whatever CPU runs it. The negative case shows
that full 8-bit weights (`--int8-weights s8`) can leave int16."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx import qmath as B
from carsam_onnx.passes.plan import plan_quantization
from carsam_onnx.passes.sites import WeightKind
from carsam_onnx.quantize import quantize
from tiny_sam import tiny_sam_paths

LAYERS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def test_vpmaddubsw_emulation_saturates_like_the_instruction():
    a = np.array([255, 255, 255, 255, 3, 4], np.uint8)
    b = np.array([127, 127, -128, -128, -5, 6], np.int8)
    np.testing.assert_array_equal(B.vpmaddubsw(a, b), [32767, -32768, 9])    # 64770 and -65280 saturate
    assert B.u8s8_pair_sum_range(np.array([[63, 63, -64, -64]]), axis=0) == (-32640, 32130)


def _layer_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray | None, int]]:
    """Integer weights read by a layer through a DequantizeLinear: name -> (values, zero point, channel axis)."""
    inits = {t.name: t for t in model.graph.initializer}
    dq_by_out = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    found = {}
    for n in model.graph.node:
        if n.op_type in LAYERS and len(n.input) > 1 and n.input[1] in dq_by_out:
            dq = dq_by_out[n.input[1]]
            if dq.input[0] not in inits:
                continue
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
            found[dq.input[0]] = (inits[dq.input[0]], zp, axis)
    return found


def _worst_case_matches_exact(q: np.ndarray, axis: int) -> bool:
    """Emulated VPMADDUBSW dot products (adjacent reduction elements paired, summed in int32 afterwards) equal
    the exact ones for each channel's worst activations: 255 where the weight is positive (largest sum), and
    255 where it is negative (smallest)."""
    w = np.moveaxis(q.astype(np.int16), axis, 0).reshape(q.shape[axis], -1)
    if w.shape[1] % 2:
        w = np.pad(w, ((0, 0), (0, 1)))
    for act in (np.where(w > 0, 255, 0), np.where(w < 0, 255, 0)):
        emulated = B.vpmaddubsw(act, w).astype(np.int64).sum(axis=1)
        if not np.array_equal(emulated, (act.astype(np.int64) * w).sum(axis=1)):
            return False
    return True


@pytest.fixture(scope="module")
def decoder_and_embeddings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sat")
    emb = np.random.default_rng(0).standard_normal((6, 256, 8, 8)).astype(np.float32)
    np.savez(tmp / "emb.npz", image_embeddings=emb)
    return tiny_sam_paths()["decoder"], tmp / "emb.npz", tmp


def _emit(decoder_and_embeddings, name, **kw):
    src, emb, tmp = decoder_and_embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(src, tmp / name, QuantConfig(bits=BitWidths(8, 8), num_calib=4, **kw), embeddings=emb,
                 progress=False, force=True)
    return onnx.load(str(tmp / name))


def _check_no_saturation(name, q, zp, axis, elem_type):
    if elem_type == TensorProto.UINT8:
        # u8: ORT's U8U8 kernels (MlasGemmU8U8KernelAvx2: bytes widened to int16, VPMADDWD into int32): pair sums
        # of uint8 x uint8 reach 2 * 255 * 255 = 130050, far inside int32. The stored grid is the signed one + 128.
        assert zp is not None and np.all(zp == 128), name
        assert 2 * 255 * int(q.max()) <= np.iinfo(np.int32).max
        return
    assert elem_type == TensorProto.INT8, name
    lo, hi = B.u8s8_pair_sum_range(q, axis)
    assert B.INT16_MIN <= lo and hi <= B.INT16_MAX, (name, lo, hi)
    assert _worst_case_matches_exact(q, axis), name


def test_default_w8a8_emission_cannot_saturate(decoder_and_embeddings):
    """The bytes the default pipeline writes (`carsam-onnx quantize --bits w8a8`, target ort)."""
    model = _emit(decoder_and_embeddings, "default.onnx")
    weights = _layer_weights(model)
    assert len(weights) >= 20
    for name, (t, zp, axis) in weights.items():
        _check_no_saturation(name, numpy_helper.to_array(t), zp, axis, t.data_type)


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_default_format_of_each_target_cannot_saturate(decoder_and_embeddings, target):
    """The default format's integer weights for both targets (trt: INT8 activations run as UINT8 + 128 in ORT,
    the same activation grid), from the same layers' float weights."""
    cfg = QuantConfig(bits=BitWidths(8, 8), target=target)
    src = onnx.load(str(decoder_and_embeddings[0]))
    inits = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    for s in plan_quantization(src, cfg).weights:
        if s.kind is WeightKind.CONSTANT:
            continue
        wq = B.weight_quant_from_minmax(inits[s.initializer], s.axis, cfg.layer_weight_bits)
        q = B.quantize_weight(inits[s.initializer], wq).astype(np.int16)
        if cfg.unsigned_weights:
            _check_no_saturation(s.initializer, q + 128, np.array([128]), s.axis, TensorProto.UINT8)
        else:
            _check_no_saturation(s.initializer, q, None, s.axis, TensorProto.INT8)


def test_full_8_bit_weights_can_saturate_vpmaddubsw(decoder_and_embeddings):
    """Negative case: full 8-bit weights (`--int8-weights s8`, MinMax: 127 in every channel) of the same layers
    leave int16."""
    src = onnx.load(str(decoder_and_embeddings[0]))
    plan = plan_quantization(src, QuantConfig())
    inits = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    over = 0
    for s in plan.weights:
        if s.kind is WeightKind.CONSTANT:
            continue
        wq = B.weight_quant_from_minmax(inits[s.initializer], s.axis, 8)
        q = B.quantize_weight(inits[s.initializer], wq)
        if B.u8s8_pair_sum_range(q, s.axis)[1] > B.INT16_MAX:
            over += 1
            assert not _worst_case_matches_exact(q, s.axis), s.initializer
    assert over >= 20, over
