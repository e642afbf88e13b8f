"""How a command ends, whatever happens inside it: bad input (CarsamError) and memory running out give one line
on stderr and exit code 2; SIGINT / SIGTERM unwind the command (temporary files removed, no output renamed into
place) and exit 128 + signal; warnings print as one line each. Every other error keeps its traceback (a bug).

    return run_guarded("quantize", lambda: work())
"""
from __future__ import annotations

import signal
import sys
import threading
import warnings
from typing import Callable

from .errors import CarsamError, first_line


def one_line_warnings(command: str, quiet: bool) -> None:
    """Python warnings as one line each, "carsam-onnx COMMAND: warning: ...", none with --quiet."""

    def show(message, category, filename, lineno, file=None, line=None):
        if not quiet:
            print(f"carsam-onnx {command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


OUT_OF_MEMORY_HINT = {
    "quantize": "Use fewer --num-calib or a smaller --recon-batch",
    "eval": "Use --runtime ort, or free the memory",
    "predict": "Use --runtime ort, or free the memory",
}


CUDA_ALLOCATION_FAILED = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError; torch's OutOfMemoryError (the caching allocator refusing a tensor; matched by name so
    the CLI never imports torch); or a CUDA call failing to allocate (context, cuBLAS handle: torch raises
    AcceleratorError, a RuntimeError, naming cudaErrorMemoryAllocation's text)."""
    if isinstance(e, MemoryError) or any(t.__name__ == "OutOfMemoryError" for t in type(e).__mro__):
        return True
    return isinstance(e, RuntimeError) and any(text in str(e).split("\n", 1)[0] for text in CUDA_ALLOCATION_FAILED)


def _first_sentence(e: BaseException) -> str:
    """What failed and how much was asked for: the message's first line, and of torch's allocator message (one
    line running on with totals and allocator advice) its first two sentences."""
    return ". ".join(first_line(e).split(". ")[:2]).rstrip(".")


class Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread: `finally` blocks and the atomic writers clean up on the way
    out exactly as for Ctrl-C (a KeyboardInterrupt subclass, so `except Exception` never swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run_guarded(command: str, run: Callable[[], int]) -> int:
    """Run `command` (`run`: its work, returning the exit code). Bad input (CarsamError), or memory running
    out -> one line on stderr, exit 2. SIGINT / SIGTERM -> the command unwinds (temporary files removed, no output
    renamed into place), one line on stderr, exit 128 + signal (130 / 143). A second signal while unwinding is
    ignored, so the cleanup finishes."""

    def on_signal(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Signalled(signum)

    def message(text: str) -> None:
        try:
            print(f"carsam-onnx {command}: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed (a pipe whose reader left): the exit code still says it
            pass

    main_thread = threading.current_thread() is threading.main_thread()   # signal handlers: main thread only
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM) if main_thread else ():
        if signal.getsignal(s) is not signal.SIG_IGN:     # started with the signal ignored (nohup, &): keep it so
            previous[s] = signal.signal(s, on_signal)
    try:
        return run()
    except CarsamError as e:
        message(f"error: {e}")
        return 2
    except Exception as e:
        if not out_of_memory(e):
            raise
        message(f"error: out of memory ({_first_sentence(e)}); nothing half-written was left. "
                f"{OUT_OF_MEMORY_HINT.get(command, 'Free memory or run on a larger machine')}")
        return 2
    except KeyboardInterrupt as e:     # Signalled, or a KeyboardInterrupt raised before our handler was in place
        signum = getattr(e, "signum", signal.SIGINT)
        message(f"interrupted by {signal.Signals(signum).name}; nothing half-written was left")
        return 128 + signum
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
