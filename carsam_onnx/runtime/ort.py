"""ONNX Runtime sessions, set up so that a Q/DQ model computes what its graph says."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import ModelError, first_line
from ..modelio import EXTERNAL_DATA_THRESHOLD, as_external_data_file, initializer_bytes
from .base import Runtime, Session
from .ort_settings import session_options


class OrtSession(Session):
    def __init__(self, sess):
        self._sess = sess
        self.input_names = tuple(i.name for i in sess.get_inputs())
        self.output_names = tuple(o.name for o in sess.get_outputs())

    def run(self, feeds):
        outs = self._sess.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
        return dict(zip(self.output_names, outs))


class OrtRuntime(Runtime):
    """ONNX Runtime on the CPU (or `providers`), at full graph optimisation with two changes (ort_settings.py, the
    one place that sets them) so that a Q/DQ model computes what its graph says:
    - INT4 weight DQ + MatMul fused into MatMulNBits computes at accuracy level 0 (float weights); at ORT's
      default level the error reaches ~1e-1 (FACTS.md);
    - the WeightBiasQuantization optimizer is off: after MatMul + Add -> Gemm fusion it rounds a float bias to
      int32 at scale (input scale x weight scale), which at 4-bit activations moved the tiny SAM's mask logits
      by ~10% of their range (tests/eval/test_ort_runtime.py, test_runtime_parity_qdq.py);
    - MatMulAddFusion is off, so that quantized Linear layers become integer kernels (MatMulIntegerToFloat)
      instead of a float Gemm on weights dequantized at every run.
    """

    name = "ort"

    def __init__(self, providers: Sequence[str] | None = None, threads: int | None = None,
                 extra_config: dict[str, str] | None = None):
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.threads = threads
        self.extra_config = dict(extra_config or {})   # session config entries on top of ort_settings' (measurements)

    def session(self, model, what):
        import onnxruntime as ort

        so = session_options(self.threads, extra=self.extra_config)   # the settings README tells users to set
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = False   # the arena grew ~3 GB per vit_b encoder run; plain allocations stay flat
        if isinstance(model, (str, Path)):
            return OrtSession(self._create(ort, str(model), so, what))
        if initializer_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
            return OrtSession(self._create(ort, model.SerializeToString(), so, what))
        # a protobuf cannot serialise past 2 GB: hand ORT a temporary file with external data
        with as_external_data_file(model) as path:
            return OrtSession(self._create(ort, str(path), so, what))

    def _create(self, ort, src, so, what):
        try:
            return ort.InferenceSession(src, so, providers=self.providers)
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load the {what}: {first_line(e)}") from None


