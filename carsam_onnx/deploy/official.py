"""segment-anything's own decoder export (``SamOnnxModel`` from its scripts/export_onnx_model.py).

Interface (kept as is when quantized): inputs ``image_embeddings [1,256,h,w]``, ``point_coords [1,N,2]``,
``point_labels [1,N]``, ``mask_input [1,1,4h,4w]``, ``has_mask_input [1]``, ``orig_im_size [2]``; outputs
``masks`` (logits upsampled to orig_im_size), ``iou_predictions``, ``low_res_masks``. Prompt convention as the
project's own graphs (labels 1/0, -1 padding, 2/3 box corners), coordinates in the S x S model frame.

The official export is TorchScript at opset 17. Q/DQ emission needs opset 21 (INT4 QuantizeLinear, the
``output_dtype`` attribute of symmetric Q), so `to_quantizable_opset` converts the graph with ONNX's
version converter (ReduceMean axes -> input and the like; the outputs are unchanged to float rounding, tested)
before planning. Calibration feeds each prompt twice (calib/feeds.py): "no mask" (``mask_input`` zeros,
``has_mask_input`` 0; samgraph.no_mask_inputs) and SAM's refinement step (``mask_input`` = the FP decoder's
``low_res_masks`` for that prompt, ``has_mask_input`` 1), unless QuantConfig.calib_mask_input is off
(``--no-calib-mask-input``); ``orig_im_size`` = (S, S) (it only sizes the ``masks`` output, which no quantized
layer reads). The mask-downscaling convs are prompt-encoder layers, float under the default keep-float list; the
refinement feed gives its statistics to the transformer sites downstream of the dense prompt embedding.
"""
from __future__ import annotations

import onnx

from ..errors import ModelError, first_line

QDQ_OPSET = 21
OLDEST_OPSET = 17          # the oldest opset converted (segment-anything's export and our TorchScript export use 17)


def opset_of(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def to_quantizable_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """(model at opset >= 21, a note saying what was converted or None)."""
    from onnx import version_converter

    opset = opset_of(model)
    if opset is None or opset >= QDQ_OPSET:
        return model, None
    if opset < OLDEST_OPSET:
        raise ModelError(f"the model has opset {opset}, older than {OLDEST_OPSET}, the oldest converted for Q/DQ "
                         f"emission; export it at opset {OLDEST_OPSET} or newer")
    meta = list(model.metadata_props)
    try:
        converted = version_converter.convert_version(model, QDQ_OPSET)
    except Exception as e:
        raise ModelError(f"cannot convert the model from opset {opset} to {QDQ_OPSET} for Q/DQ emission: "
                         f"{type(e).__name__}: {first_line(e)}") from None
    del converted.metadata_props[:]
    converted.metadata_props.extend(meta)
    return converted, f"converted from opset {opset} to {QDQ_OPSET} (ONNX version converter) for Q/DQ emission"
