"""Progress where no terminal shows bars: one timestamped line per stage or unit on stderr (batch jobs, CI logs,
remote runs). tqdm's bars are off there (`disable=None`), so without this a long quantize run says nothing until
it ends."""
from __future__ import annotations

import sys
import time


class StageLog:
    """log("what happened"): "[  12.3 s] what happened" on stderr when enabled; nothing otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:8.1f} s] {message}", file=sys.stderr, flush=True)


def stage_log(progress: bool) -> StageLog:
    """On when progress is asked for and stderr is no terminal (where the bars are off)."""
    return StageLog(bool(progress) and not sys.stderr.isatty())
