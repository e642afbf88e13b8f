"""Reading and writing files safely: clear errors on bad input, atomic writes (a temporary file in the target
folder, then a rename: `atomic_write` for bytes and text, `save_model` for ONNX with external data past ~1.8 GB)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import onnx

from .errors import ModelError, OutputError, first_line

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initializers above which weights go to FILE.onnx.data


def load_model(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:
        raise ModelError(f"{path} is not a readable ONNX model ({type(e).__name__}: {first_line(e)})") from None
    if not model.graph.node:
        raise ModelError(f"{path} is not an ONNX model with a graph (empty or truncated file?)")
    return model


def check_writable(path: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail early (before any long work) if `path` cannot be written, or if it names one of `inputs` (an input
    file is never overwritten, --force or not)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory, not a file path")
    for src in inputs:
        if src is not None and _same_file(path, Path(src)):
            raise OutputError(f"{path} is also an input of this command; write the output to another file")
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {parent} is not writable")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            total += (n + 1) // 2
        else:
            total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


@contextmanager
def _tempdir_beside(path: Path):
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: str | Path, force: bool = False) -> Path:
    """Write `model` to `path` via a temporary file in the same folder and a rename.

    Models whose weights exceed ~1.8 GB are written with external data in PATH.data.
    """
    path = check_writable(path, force)
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    try:
        with _tempdir_beside(path) as tmp:
            tmp_model = tmp / path.name
            if external:
                onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024)
                os.replace(tmp / data_name, path.parent / data_name)
                try:
                    os.replace(tmp_model, path)
                except BaseException:   # interrupted between the two renames: no data file without its model
                    (path.parent / data_name).unlink(missing_ok=True)
                    raise
            else:
                onnx.save_model(model, str(tmp_model))
                os.replace(tmp_model, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def atomic_write(path: str | Path, data: bytes | str, force: bool = False) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `path` via a temporary file in the same folder and a rename."""
    path = check_writable(path, force)
    payload = data.encode() if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException as e:      # an error or an interruption leaves no temporary file
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


def write_json(path: str | Path, obj, force: bool = False) -> Path:
    """`obj` as indented JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2), force=force)


def file_sha256(path: str | Path) -> str:
    """sha256 of a model file and, when present, its external data file PATH.data."""
    path = Path(path)
    h = hashlib.sha256()
    for p in (path, path.with_name(path.name + ".data")):
        if p.is_file():
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


@contextmanager
def as_external_data_file(model: onnx.ModelProto):
    """A temporary copy of `model` with its weights in external data, for protos past the 2 GB limit of one
    serialization; yields the path of the .onnx file (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="carsam-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        yield path
