"""Frozen configuration objects. Defaults live here and nowhere else (the CLI reads them from here)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, is_dataclass

from .errors import InputError

# Modules that the SAM PTQ papers (PTQ4SAM, CAR-SAM, SAQ-SAM) keep in float. Patterns are regular
# expressions searched in ONNX node names and in the module path kept in node metadata
# ("/image_encoder.patch_embed.proj/Conv" from the dynamo exporter, "/image_encoder/patch_embed/proj/Conv"
# from the TorchScript exporter).
DEFAULT_KEEP_FLOAT: tuple[str, ...] = (
    r"patch_embed",                      # patch embedding
    r"output_upscaling",                 # mask upscaling (ConvTranspose + LayerNorm2d)
    r"output_hypernetworks_mlps",        # hypernetwork MLPs
    r"iou_prediction_head",              # IoU head
    r"prompt_encoder",                   # prompt encoder
)


@dataclass(frozen=True)
class BitWidths:
    """`wXaY`: X-bit weights, Y-bit activations (Y = 16 means activations stay float)."""

    weight: int
    activation: int  # 16 -> not quantized

    @property
    def quantize_activations(self) -> bool:
        return self.activation < 16

    def __str__(self) -> str:
        return f"w{self.weight}a{self.activation}"

    @classmethod
    def parse(cls, text: str) -> "BitWidths":
        m = re.fullmatch(r"w(\d+)a(\d+)", text.strip().lower())
        if not m:
            raise InputError(f"--bits {text!r} is not of the form wXaY (e.g. w8a8, w4a4, w4a16)")
        w, a = int(m.group(1)), int(m.group(2))
        if not 2 <= w <= 8:
            raise InputError(f"--bits {text}: weight bits must be 2..8")
        if not (2 <= a <= 8 or a == 16):
            raise InputError(f"--bits {text}: activation bits must be 2..8, or 16 for float activations")
        return cls(w, a)


# Integer layout of 8-bit weights in layers whose weights meet quantized activations (docs/quantization_format.md,
# "Integer formats and the host's instruction set"):
#   s8: INT8 in [-128, 127]. ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI (VPMADDUBSW) add pairs of
#       uint8 x int8 products in saturating int16 (255 * 127 * 2 > 32767): results depend on the host;
#   s7: INT8 in [-64, 63] (7-bit weights, "reduce range"): 255 * 64 * 2 = 32640 fits int16 on every x86 CPU;
#   u8: UINT8 with zero point 128 (full 8-bit grid; ONNX Runtime runs U8U8 kernels, which widen to int16 first);
#       --target ort only (TensorRT takes INT8 weights);
#   auto: u8 for --target ort, s7 for --target trt.
# Chosen by docs/results.md "W8A8 by integer format" (2026-12-02): both u8 and s7 are exact in a default ORT
# session on an AVX2-only CPU (emulated); u8 keeps the 8-bit grid (random-init vit_b decoder 32.1 dB vs s7 28.7 dB;
# reference model default-session segm mAP 79.97 vs s7 79.89, s8 80.1) at the same latency on this VNNI CPU
# (encoder 192 vs 190 ms CPU time).
INT8_WEIGHT_FORMATS: tuple[str, ...] = ("auto", "s8", "s7", "u8")


def _on_cuda(device) -> bool:
    """Whether a device string ("cpu", "cuda", "cuda:1") names a GPU: which schedule's defaults apply."""
    return str(device).startswith("cuda")


@dataclass(frozen=True)
class ReconConfig:
    """Block reconstruction (`--method recon`; calib/recon/). The published QDrop/PTQ4SAM recipe
    (shared/RESEARCH.md) except the iteration counts, which are schedules sized to a time budget."""

    init_method: str = "mse"          # calibrator that gives the weight scales and the initial step sizes
    iters: int | None = None          # steps per unit; None: cpu_iters (cpu_iters_3bit) on a CPU, gpu_iters on a GPU
    cpu_iters: int = 200              # CPU schedule: sized so that --method recon --bits w4a4 on the reference
                                      # model fits 15 min on 2 cores
    cpu_iters_3bit: int = 400         # CPU schedule when weights and activations both have <= 3 bits. Seed 2, W3A3,
                                      # 3 calibration seeds: recon 68.04 +- 0.62 against 59.42 +- 3.21 at 200 (2x at
                                      # W4A4: 1.8x the time; docs/results.md, "W3A3 at 2x the CPU schedule")
    gpu_iters: int = 500              # GPU schedule: recon W4A4 on the reference model 47 s alone on an H100
                                      # (twelfth GPU round; 170 s on an H200 in the fourth, older code)
    decoder_factor: int = 1           # mask-decoder units take this many times the steps of an encoder unit (they
                                      # are a few percent of a full model's reconstruction time); JCAR's joint units
                                      # also multiply by their member count. Seed 2, GPU, W4A4 recon, 3 calibration
                                      # seeds: 4 gave 76.36 +- 0.16 against 76.30 +- 0.21 (within the std; about
                                      # 20% more time), so 1 stays (docs/results.md, thirteenth session)
    batch_size: int | None = None     # calibration images per step; None: cpu_batch_size / gpu_batch_size
    cpu_batch_size: int = 1           # published: 1 (vmapped batches were slower than a loop on 2 CPU cores)
    gpu_batch_size: int = 8           # one vmapped step over 8 images (SAM graphs are exported for batch 1)
    round_lr: float | None = None     # Adam, AdaRound offsets; None: cpu_round_lr / gpu_round_lr
    cpu_round_lr: float = 1e-2        # CPU schedule: 10x the published rate. At 1e-3, 200 steps move an offset by
                                      # at most 0.2 (h by 0.06): few weights leave nearest rounding (0.7% in a
                                      # 50 x 8 probe; 6.4% at 1e-2), docs/results.md; chosen on seed 2
    gpu_round_lr: float = 3e-2        # GPU schedule: 30x the published rate (500 steps x 8 images: at 1e-3 the
                                      # offsets barely move). On seed 2, 3 calibration seeds: 1e-2 gave W3A3 56.4
                                      # against 39.6 at 1e-3; with LSQ at 1.6e-4, W4A4 76.28 at 3e-2 against 76.00
                                      # at 1e-2 (docs/results.md)
    scale_lr: float | None = None     # Adam with cosine decay to 0, LSQ step sizes; None: cpu_ / gpu_scale_lr
    cpu_scale_lr: float = 1.6e-4      # CPU schedule: 4x the published 4e-5, as on the GPU. W4A4 on seed 2, 3
                                      # calibration seeds (AVX-512 host): carsam 75.09 +- 0.28 against 74.40 +- 0.19
                                      # at 4e-5, higher on every seed; 4e-5 had beaten LSQ off (74.98 +- 0.49 against
                                      # 73.84 +- 0.68, recon) once codes on a bound passed a gradient (clamp_ste;
                                      # docs/results.md)
    gpu_scale_lr: float = 1.6e-4      # GPU schedule: 4x the published 4e-5. On seed 2, W4A4, 3 calibration seeds
                                      # (AdaRound 3e-2): 76.28 +- 0.24 against 75.61 +- 0.25 at 4e-5 and 76.04 +- 0.23
                                      # at 4e-4 (docs/results.md)
    scale_lr_ref: float | None = None  # None: scale_lr for every step size (published). A number: each step size
                                      # s0 learns at scale_lr * s0 / scale_lr_ref (Adam's steps are absolute, so
                                      # small step sizes, e.g. softmax outputs, would move most in relative terms)
    round_weight: float = 0.01        # weight of the rounding regulariser sum(1 - |2h - 1|^beta)
    warmup: float = 0.2               # share of a unit's steps without the regulariser
    beta_start: float = 20.0          # regulariser exponent, annealed linearly after the warm-up ...
    beta_end: float = 2.0             # ... down to this
    drop_prob: float = 0.5            # QDrop: probability that an element keeps its float value while learning
    cache_device_fraction: float = 0.5  # cached unit inputs stay on the GPU if they take <= this share of free memory
    image_cut: bool = True            # full models: decoder units' captures start at the cached encoder output
    stream_cut: bool = True           # each capture resumes at the values where the previous one stopped, not at
                                      # the image (calib/recon/frontier.py; the same captured values)
    cuda_graphs: bool = True          # GPU: each unit's vmapped step is captured once as a CUDA graph and replayed
                                      # (calib/recon/graph_step.py); a unit that cannot be captured runs eagerly
    tf32: bool = True                 # GPU: TF32 matmuls and convolutions while units are reconstructed (their
                                      # inputs' capture, the steps, the guard); the emitted model is unaffected.
                                      # Chosen on seed 2: W4A4 recon 75.63 +- 0.36 against 75.66 +- 0.37 with
                                      # IEEE fp32 steps (3 calibration seeds); vit_b 477 s, over 10 min without
    unit_guard: bool = True           # after each unit: keep the calibrator's rounding and step sizes if they
                                      # reconstruct the unit better than what was learned (fully quantized, on ...
    guard_images: int = 8             # ... the first this many calibration images)

    def __post_init__(self):
        if self.init_method not in ("minmax", "percentile", "mse"):
            raise InputError(f"recon init method {self.init_method!r}: choose minmax, percentile or mse")
        for name in ("cpu_iters", "cpu_iters_3bit", "gpu_iters", "cpu_batch_size", "gpu_batch_size", "guard_images"):
            if getattr(self, name) < 1:
                raise InputError(f"recon {name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.decoder_factor < 1:
            raise InputError(f"--recon-decoder-factor {self.decoder_factor}: must be >= 1")
        if self.iters is not None and self.iters < 1:
            raise InputError(f"--recon-iters {self.iters}: must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"--recon-batch {self.batch_size}: must be >= 1")
        for name in ("round_lr", "scale_lr", "cpu_round_lr", "gpu_round_lr", "cpu_scale_lr", "gpu_scale_lr"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < math.inf:
                raise InputError(f"--recon-{name.replace('_', '-')} {getattr(self, name)}: must be a finite number >= 0")
        if self.scale_lr_ref is not None and not 0 < self.scale_lr_ref < math.inf:
            raise InputError(f"--recon-scale-lr-ref {self.scale_lr_ref}: must be a finite number > 0")
        if not 0 <= self.drop_prob < 1:
            raise InputError(f"--recon-drop {self.drop_prob}: must be in [0, 1)")
        if not 0 <= self.warmup < 1:
            raise InputError(f"recon warm-up {self.warmup}: must be in [0, 1)")

    def for_device(self, name: str, device: str):
        """The field `name` if set, else its device default (`gpu_<name>` on CUDA, `cpu_<name>` otherwise)."""
        value = getattr(self, name)
        if value is not None:
            return value
        return getattr(self, ("gpu_" if _on_cuda(device) else "cpu_") + name)

    def round_lr_for(self, device: str) -> float:
        return self.for_device("round_lr", device)

    def scale_lr_base(self, device: str) -> float:
        return self.for_device("scale_lr", device)

    def scale_lr_for(self, s0: float, device: str) -> float:
        lr = self.scale_lr_base(device)
        return lr if self.scale_lr_ref is None else lr * s0 / self.scale_lr_ref

    def iters_for(self, device: str, bits: BitWidths | None = None) -> int:
        """Steps per unit: iters if set, else the device's schedule (on a CPU, cpu_iters_3bit where `bits` has
        weights and activations of 3 bits or fewer)."""
        if self.iters is None and not _on_cuda(device) and bits is not None and max(bits.weight, bits.activation) <= 3:
            return self.cpu_iters_3bit
        return self.for_device("iters", device)

    def unit_iters(self, device: str, unit, bits: BitWidths | None = None) -> int:
        """Steps of one unit (passes/units.Unit): iters_for, times decoder_factor for a mask-decoder unit, times
        the member count for a joint unit."""
        return (self.iters_for(device, bits) * max(1, len(unit.members))
                * (self.decoder_factor if unit.in_decoder else 1))

    def batch_for(self, device: str) -> int:
        return self.for_device("batch_size", device)

HELDOUT = 2             # held-out images (one box each) for the quantize summary's output SQNR (and the report's
                        # default; quantize --report-images N measures the report on N)
MAX_REPORT_IMAGES = 64  # --report-images: each runs through the FP, baseline and quantized models
JCAR_PAIRINGS: tuple[str, ...] = ("attn", "mlp", "layer")


@dataclass(frozen=True)
class CarsamConfig:
    """`--method carsam` = reconstruction + MAC + JCAR (calib/recon/, calib/mac/); the flags ablate it.

    JCAR pairings, per two-way decoder layer (passes/units.py joint_units):
    - attn: the token->image and image->token attentions learn together (the MLP between them runs inside the
      joint unit, reconstructed on its own just before it);
    - mlp: token->image attention, MLP and image->token attention learn together;
    - layer: the whole layer (self-attention too) learns together.
    A joint unit of k units gets k times the per-unit steps, so the step budget equals unit-by-unit's."""

    use_mac: bool = True              # --mac / --no-mac
    use_jcar: bool = True             # --jcar / --no-jcar
    mac_rounding: str = "learn"       # --mac-rounding: learn (AdaRound from MAC's corrected weights) | nearest
                                      # (every q/k/v projection in MAC's scope keeps nearest rounding)
    pairing: str = "attn"             # --jcar-pairing (JCAR_PAIRINGS). Seed 2, full model, GPU default, recon + JCAR,
                                      # 3 calibration seeds: W4A4 attn 76.33, mlp 76.18, layer 76.06; W3A3 attn 66.01,
                                      # mlp 65.67 (docs/results.md, ninth GPU round). The decoder-only probe (one
                                      # calibration seed) had mlp 78.60, layer 78.47, attn 78.35
    joint_fallback: bool = False      # --jcar-fallback: a joint unit whose learned values the unit guard rejects
                                      # (worse than the calibrator's) is followed by its members reconstructed one
                                      # by one, as recon would; off: the calibrator's values stay in all of them

    def __post_init__(self):
        if self.mac_rounding not in MAC_ROUNDING:
            raise InputError(f"--mac-rounding {self.mac_rounding!r}: choose one of {', '.join(MAC_ROUNDING)}")
        if self.pairing not in JCAR_PAIRINGS:
            raise InputError(f"--jcar-pairing {self.pairing!r}: choose one of {', '.join(JCAR_PAIRINGS)}")
MAC_QK_MODES: tuple[str, ...] = ("q", "k", "qk", "none")
MAC_SCOPES: tuple[str, ...] = ("decoder", "all")
MAC_GRANULARITY: tuple[str, ...] = ("head", "projection")
MAC_WHEN: tuple[str, ...] = ("start", "decoder")
MAC_ROUNDING: tuple[str, ...] = ("learn", "nearest")


@dataclass(frozen=True)
class MacConfig:
    """MatMul-Aware Compensation (CAR-SAM; calib/mac/): closed-form corrections of the
    attention projections' float weights. Defaults chosen on validation seed 2 (docs/results.md, "MAC: lambda
    and mode chosen on seed 2")."""

    lam_rel: float = 100.0         # ridge lam = lam_rel * mean eigenvalue of the normal-equation operator. Seed 2,
                                   # full model, GPU default, recon + MAC, 3 calibration seeds: W4A4 76.39 at 100
                                   # against 76.19 at 10 (W3A3 65.66 against 65.42; docs/results.md, ninth GPU
                                   # round). The decoder-only probe had preferred 10: mask SQNR 19.35 / 20.98 /
                                   # 21.35 / 20.20 dB at 0.1 / 1 / 10 / 100 (q + v), a weaker criterion
    qk: str = "k"                  # q: K's error into W_Q; k: Q's error into W_K; qk: both, W_Q first; none
                                   # seed 2 (lam_rel 10, + v): k 21.54, q 21.35, qk 20.53 dB; full model (GPU, W4A4,
                                   # recon + MAC, lam_rel 10): k 76.19, q 76.27 (within the std: k stays)
    v: bool = True                 # the softmax output's error into W_V (seed 2, k: 21.54 dB with, 18.36 without;
                                   # full model, GPU, W4A4, lam_rel 10: 76.19 with, 76.17 without)
    solve: str = "factored"        # factored | exact (calib/mac/solve.py)
    granularity: str = "head"      # head: one Q.K^T problem per head (each head's scores); projection: one for the
                                   # whole q or k projection, whose target is the heads' scores summed (the
                                   # variant the paper leaves open; the check images still judge each head's
                                   # scores, so it is kept only where it lowers them)
    scope: str = "decoder"         # decoder: the two-way decoder's attention sites (the paper's); all: also the
                                   # image encoder's (CPU W4A4, seed 2, 3 calibration seeds: -2.6 mAP against
                                   # recon; the corrections compound through the blocks, docs/results.md)
    when: str = "start"            # start: on the calibrator's model, before any unit is reconstructed; decoder:
                                   # just before the first unit with a corrected projection (the encoder's units
                                   # finished, so MAC sees the embeddings the quantized decoder will get)
    check_fraction: float = 0.25   # share of the calibration images held back to judge each correction
    shrink: tuple[float, ...] = (1.0, 0.5, 0.25)   # correction strengths tried on the check images

    def __post_init__(self):
        if self.qk not in MAC_QK_MODES:
            raise InputError(f"MAC qk mode {self.qk!r}: choose one of {', '.join(MAC_QK_MODES)}")
        if self.solve not in ("factored", "exact"):
            raise InputError(f"MAC solve {self.solve!r}: choose factored or exact")
        if self.when not in MAC_WHEN:
            raise InputError(f"MAC when {self.when!r}: choose one of {', '.join(MAC_WHEN)}")
        if self.granularity not in MAC_GRANULARITY:
            raise InputError(f"MAC granularity {self.granularity!r}: choose one of {', '.join(MAC_GRANULARITY)}")
        if self.scope not in MAC_SCOPES:
            raise InputError(f"MAC scope {self.scope!r}: choose one of {', '.join(MAC_SCOPES)}")
        if not 0 < self.lam_rel < float("inf"):
            raise InputError(f"--mac-lambda {self.lam_rel}: must be a finite number > 0")
        if not 0 < self.check_fraction < 1:
            raise InputError(f"MAC check_fraction {self.check_fraction}: must be in (0, 1)")
        if not self.shrink or not all(0 < a <= 1 for a in self.shrink):
            raise InputError(f"MAC shrink {self.shrink}: give strengths in (0, 1]")


SMOOTH_ALPHA = 0.5      # --smooth auto. Seed 2, W4A4, CPU default schedule, 3 calibration seeds: recon 75.48 -> 76.34,
                        # carsam 75.44 -> 76.13 (0.7: 76.19, within the std); MSE 72.82 -> 73.48 (0.7: 73.68)
                        # (docs/results.md, "Scale migration")
SMOOTH_METHODS = ("recon", "carsam")   # auto: the calibrators (minmax, percentile, mse) stay as their tables were
                                       # measured; --smooth ALPHA gives them the migration too


@dataclass(frozen=True)
class QuantConfig:
    bits: BitWidths = BitWidths(8, 8)
    method: str = "minmax"                 # a name of calib/registry.py (checked there: the one list)
    target: str = "ort"                    # ort: asymmetric activations; trt: symmetric, zero-point 0
    block_size: int | None = None          # blocked INT4 weights (None: per output channel)
    percentile: float = 99.99
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    num_calib: int = 32
    seed: int = 0
    device: str = "cpu"
    require_attention: bool = False
    recon: ReconConfig = ReconConfig()     # --method recon and carsam
    carsam: CarsamConfig = CarsamConfig()  # --method carsam only
    mac: MacConfig = MacConfig()           # MAC (calib/mac.apply_mac; --method carsam)
    int8_weights: str = "auto"             # INT8_WEIGHT_FORMATS: u8 (ort) / s7 (trt); figures beside the tuple
    calib_mask_input: bool = True          # segment-anything's decoder export: per prompt also the refinement feed
                                           # (mask_input = FP low-res logits, has_mask_input 1; calib/feeds.py)
    smooth: float | str | None = "auto"    # --smooth ALPHA: migrate activation scales into the weights at every
                                           # norm -> weight-layer pair before calibrating (calib/smooth.py); None
                                           # (--no-smooth): off; "auto": SMOOTH_ALPHA for SMOOTH_METHODS, else off

    def __post_init__(self):
        if self.target not in ("ort", "trt"):
            raise InputError(f"--target {self.target!r}: choose ort or trt")
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise InputError(f"--block-size {self.block_size}: use a power of two >= 16")
        if self.block_size is not None and self.bits.weight > 4:   # docs/quantization_format.md, ORT notes
            raise InputError(f"--block-size is for 2-4-bit weights (INT4 blocks); --bits {self.bits} has "
                             f"{self.bits.weight}-bit weights, which are quantized per output channel")
        if not 0 < self.percentile <= 100:
            raise InputError(f"--percentile {self.percentile}: must be in (0, 100]")
        if self.num_calib < 1:
            raise InputError(f"--num-calib {self.num_calib}: must be >= 1")
        if not 0 <= self.seed < 2**32:                          # numpy's generators take no negative seed
            raise InputError(f"--seed {self.seed}: must be in 0..{2**32 - 1}")
        if self.int8_weights not in INT8_WEIGHT_FORMATS:
            raise InputError(f"--int8-weights {self.int8_weights!r}: choose one of {', '.join(INT8_WEIGHT_FORMATS)}")
        if self.smooth not in (None, "auto") and not (isinstance(self.smooth, (int, float)) and 0 <= self.smooth <= 1):
            raise InputError(f"--smooth {self.smooth}: alpha must be in [0, 1] (or auto)")
        if self.int8_weights == "u8" and self.target == "trt":
            raise InputError("--int8-weights u8 needs --target ort (TensorRT takes INT8 weights only)")

    @property
    def smooth_alpha(self) -> float | None:
        """The migration strength this run uses (smooth with "auto" resolved for the method), or None: none."""
        if self.smooth == "auto":
            return SMOOTH_ALPHA if self.method in SMOOTH_METHODS else None
        return self.smooth

    @property
    def symmetric_activations(self) -> bool:
        return self.target == "trt"

    @property
    def int8_format_applies(self) -> bool:
        """True when int8_weights shapes the weights: 8-bit weights that meet quantized activations."""
        return self.bits.weight == 8 and self.bits.quantize_activations

    @property
    def int8_weight_format(self) -> str:
        """int8_weights with "auto" resolved for the target: u8 (ort) or s7 (trt)."""
        if self.int8_weights != "auto":
            return self.int8_weights
        return "s7" if self.target == "trt" else "u8"

    @property
    def layer_weight_bits(self) -> int:
        """Grid width of the weights of quantized layers (not of position tables): 7 under format "s7"."""
        return 7 if self.int8_format_applies and self.int8_weight_format == "s7" else self.bits.weight

    @property
    def unsigned_weights(self) -> bool:
        """Layer weights stored UINT8 with zero point 128 (format "u8")."""
        return self.int8_format_applies and self.int8_weight_format == "u8"


@dataclass(frozen=True)
class ExportConfig:
    model_type: str = "vit_b"
    checkpoint: str | None = None
    seed: int | None = None
    exporter: str = "dynamo"               # dynamo | torchscript
    multimask: bool = False
    split: bool = False
    force: bool = False

    def __post_init__(self):
        if self.seed is not None and not 0 <= self.seed < 2**63:   # torch.manual_seed takes a signed 64-bit seed
            raise InputError(f"--seed {self.seed}: must be in 0..{2**63 - 1}")


@dataclass(frozen=True)
class EvalConfig:
    """`carsam-onnx eval`: one box prompt per instance, COCO segm metrics."""

    prompts: str = "gt"                    # gt (ground-truth boxes) or a COCO detection-results JSON
    min_score: float = 0.0                 # drop detector boxes scoring below this
    limit: int | None = None               # evaluate the first N images only
    runtime: str = "ort"                   # a name of runtime/registry.py: ort | torch | registered ones
    device: str | None = None              # torch device for --runtime torch (cpu, cuda); cuda for ORT's CUDA EP
    provider: str | None = None            # ONNX Runtime execution provider: cpu | cuda | tensorrt (runtime/providers.py)
    threads: int | None = None             # CPU threads of the runtime (ORT's intra-op threads; torch's on the CPU);
                                           # None: the runtime's own default (ORT: one per core). At 4-bit
                                           # activations ORT's scores depend on it (docs/results.md, "ORT against
                                           # itself"): fix it to compare runs across machines

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit {self.limit}: must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads {self.threads}: must be >= 1")


def config_to_dict(config) -> dict:
    """A config dataclass as JSON-ready values (BitWidths as "wXaY", tuples as lists, nested configs as dicts)."""
    def value(v):
        if isinstance(v, BitWidths):
            return str(v)
        if is_dataclass(v):
            return config_to_dict(v)
        if isinstance(v, tuple):
            return [value(x) for x in v]
        return v
    return {f.name: value(getattr(config, f.name)) for f in fields(config)}


def config_from_dict(cls, data: dict):
    """Inverse of config_to_dict; a missing key takes the default, an unknown key is an InputError."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{cls.__name__} has no setting {', '.join(unknown)} (made by another carsam-onnx version?)")
    kwargs = {}
    for name, v in data.items():
        default = known[name].default
        if isinstance(default, BitWidths):
            v = BitWidths.parse(v)
        elif is_dataclass(default):
            v = config_from_dict(type(default), v)
        elif isinstance(default, tuple):
            v = tuple(v)
        kwargs[name] = v
    return cls(**kwargs)
