"""Build a TensorRT engine from a Q/DQ ONNX model (explicit quantization, strongly typed network).

Written against TensorRT's documented Python API (tensorrt >= 10): Builder, NetworkDefinition created with the
STRONGLY_TYPED flag (the Q/DQ graph fixes every precision; precision flags are not set), OnnxParser,
BuilderConfig with a workspace memory-pool limit, and one optimization profile for the dynamic inputs
(SAM's num_points axis of point_coords / point_labels). TensorRT is imported only when an engine is built.

NOT RUN HERE: no machine this project has can install TensorRT, so build_engine() has never executed. What is
tested is the part that needs no TensorRT: the static Q/DQ rule check it runs first (passes/trt_rules.py), the
shape-profile and build-configuration logic (engine_config, shape_profile, trtexec_command), and the error when
tensorrt is missing. docs/tensorrt.md says what was and was not verified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import CarsamError, InputError, ModelError
from ..modelio import atomic_write, check_writable, load_model
from ..passes.trt_rules import check_trt, errors

Shape = tuple[int, ...]
DEFAULT_DYNAMIC_DIMS: dict[str, tuple[int, int, int]] = {"num_points": (1, 2, 16)}   # (min, opt, max)
POINT_INPUTS = ("point_coords", "point_labels")


@dataclass(frozen=True)
class EngineConfig:
    """Everything build_engine hands to TensorRT, decided without TensorRT."""

    strongly_typed: bool = True
    fp16: bool = False                 # weakly typed networks only
    int8: bool = False                 # weakly typed networks only
    workspace_bytes: int = 4 << 30
    profile: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)   # input -> (min, opt, max)


def input_dims(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Graph inputs (not initializers) -> dims: int for fixed, the symbol name (or None) for dynamic dims."""
    inits = {t.name for t in model.graph.initializer}
    dims = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        shape = v.type.tensor_type.shape
        dims[v.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim)
    return dims


def shape_profile(inputs: dict[str, tuple[int | str | None, ...]],
                  dynamic_dims: dict[str, tuple[int, int, int]] | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Optimization-profile shapes (min, opt, max) for every input that has a dynamic dimension.

    A dynamic dim is looked up by its symbol in `dynamic_dims` (default: num_points 1 / 2 / 16). An unnamed
    dynamic dim of point_coords / point_labels at axis 1 is taken as num_points (exporters that drop the name).
    Any other dynamic dim is an error: TensorRT needs a range for it.
    """
    ranges = dict(DEFAULT_DYNAMIC_DIMS if dynamic_dims is None else dynamic_dims)
    for sym, r in ranges.items():
        if len(r) != 3 or not all(isinstance(x, int) for x in r) or not 1 <= r[0] <= r[1] <= r[2]:
            raise InputError(f"shape range for {sym!r} must be integers min <= opt <= max, min >= 1 (got {r})")
    profile = {}
    for name, dims in inputs.items():
        if all(isinstance(d, int) and d > 0 for d in dims):
            continue
        lo, opt, hi = [], [], []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                lo.append(d), opt.append(d), hi.append(d)
                continue
            sym = d if isinstance(d, str) else ("num_points" if name in POINT_INPUTS and axis == 1 else None)
            if sym not in ranges:
                raise InputError(f"input {name} has a dynamic dimension {axis} ({d or 'unnamed'}) with no shape "
                                 f"range; give one, e.g. dynamic_dims={{{(sym or 'name')!r}: (1, 2, 16)}}")
            mn, op, mx = ranges[sym]
            lo.append(mn), opt.append(op), hi.append(mx)
        profile[name] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


def engine_config(model: onnx.ModelProto, *, strongly_typed: bool = True, fp16: bool = False, int8: bool = False,
                  workspace_gb: float = 4.0,
                  dynamic_dims: dict[str, tuple[int, int, int]] | None = None) -> EngineConfig:
    """Check the options and derive the optimization profile from the model's inputs."""
    if strongly_typed and (fp16 or int8):
        raise InputError("fp16/int8 flags do not apply to a strongly typed network (the Q/DQ graph fixes the "
                         "precisions); drop them, or build weakly typed with strongly_typed=False")
    if not (math.isfinite(workspace_gb) and workspace_gb > 0):
        raise InputError(f"workspace {workspace_gb} GB must be > 0")
    return EngineConfig(strongly_typed, fp16, int8, int(workspace_gb * (1 << 30)),
                        shape_profile(input_dims(model), dynamic_dims))


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, cfg: EngineConfig) -> list[str]:
    """The same build as a trtexec command line (for machines with TensorRT's tools but no Python bindings)."""
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           f"--memPoolSize=workspace:{max(1, cfg.workspace_bytes >> 20)}M"]
    if cfg.strongly_typed:
        cmd.append("--stronglyTyped")
    else:
        cmd += [f for f, on in (("--fp16", cfg.fp16), ("--int8", cfg.int8)) if on]
    for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        if cfg.profile:
            spec = ",".join(f"{n}:{'x'.join(map(str, shapes[k]))}" for n, shapes in cfg.profile.items())
            cmd.append(f"{flag}={spec}")
    return cmd


def import_tensorrt():
    try:
        import tensorrt  # noqa: PLC0415 - optional, heavy, GPU-only
    except ImportError:
        raise CarsamError("TensorRT is not installed: pip install tensorrt (NVIDIA's package, >= 10; on a Jetson use "
                          "JetPack's python3-libnvinfer) on a machine "
                          "with an NVIDIA GPU to build engines") from None
    return tensorrt


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, strongly_typed: bool = True,
                 fp16: bool = False, int8: bool = False, workspace_gb: float = 4.0,
                 dynamic_dims: dict[str, tuple[int, int, int]] | None = None, check: bool = True,
                 force: bool = False) -> Path:
    """Parse `onnx_path` with TensorRT's ONNX parser and write a serialized engine to `engine_path`.

    check: first run the static TensorRT Q/DQ rule check and refuse models with errors (ModelError).
    dynamic_dims: symbol -> (min, opt, max) for dynamic input dims (default num_points 1 / 2 / 16).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model = load_model(onnx_path)
    cfg = engine_config(model, strongly_typed=strongly_typed, fp16=fp16, int8=int8, workspace_gb=workspace_gb,
                        dynamic_dims=dynamic_dims)
    if check:
        found = errors(check_trt(model))
        if found:
            raise ModelError(f"{onnx_path} has {len(found)} TensorRT Q/DQ rule violations (first: {found[0]}); "
                             f"quantize with --target trt or see docs/tensorrt.md")
    del model
    check_writable(engine_path, force, inputs=[onnx_path])
    trt = import_tensorrt()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if cfg.strongly_typed:
        if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            raise CarsamError(f"TensorRT {trt.__version__} has no strongly typed networks; use TensorRT >= 10")
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):     # resolves external data beside the file
        msgs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"TensorRT cannot parse {onnx_path}: {msgs[0] if msgs else 'no detail'}"
                         + (f" (+{len(msgs) - 1} more)" if len(msgs) > 1 else ""))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if not cfg.strongly_typed:
        if cfg.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if cfg.int8:
            config.set_flag(trt.BuilderFlag.INT8)
    if cfg.profile:
        profile = builder.create_optimization_profile()
        for name, (mn, op, mx) in cfg.profile.items():
            profile.set_shape(name, mn, op, mx)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    return atomic_write(engine_path, memoryview(serialized), force=True)
