"""The built-in calibration and validation sets: synthetic COCO-format data from fixed, disjoint seeds.

Training data for the reference model use seeds from TRAIN_SEED_BASE up (tools/train_reference.py);
calibration and validation sets have their own seeds, so the three never share an image.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from .memory import check_images_fit
from .prompts import CalibSample, load_calibration_set
from .synth import write_synthetic_coco

CALIBRATION_SEED = 1
VALIDATION_SEED = 2
HELDOUT_SEED = 3          # held-out prompts for the quantize summary's SQNR
SYNTH_IMAGE_SIZE = 256


def builtin_calibration_set(num: int, seed: int, image_size: int, data_seed: int = CALIBRATION_SEED,
                            warn: bool = True) -> list[CalibSample]:
    """`num` synthetic images with ground-truth box prompts, preprocessed for a model of `image_size`."""
    check_images_fit(num, image_size)
    if warn:
        warnings.warn("no --calib-images given: calibrating on the built-in synthetic set "
                      f"({num} images, seed {data_seed}); use real images of your domain for deployment",
                      stacklevel=2)
    with tempfile.TemporaryDirectory(prefix="carsam-calib-") as tmp:
        out = Path(tmp) / "set"
        write_synthetic_coco(out, num, data_seed, image_size=SYNTH_IMAGE_SIZE)
        return load_calibration_set(out, None, num, seed, image_size)
