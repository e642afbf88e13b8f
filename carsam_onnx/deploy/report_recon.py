"""Report section: reconstruction loss curves per unit (issue 12: the oscillation JCAR removes).

ctx.extra["recon_units"]: the run's per-unit records (calib/recon/loop.py UnitStats: name, kind, iters,
loss_start, loss_end and `curve`, the loss of every step or of an evenly spaced subsample of them);
ctx.extra["recon_compare"]: an optional second list (e.g. unit-by-unit against JCAR), drawn in the same panel
where the unit names match and in panels of its own where they do not; ctx.extra["recon_labels"]: legend
names of the two lists (default "this run", "compare"). Units without a curve are left out of the plot and
listed in the table. A joint unit of one list whose members are units of the other (JCAR against unit by unit)
shares their panel: the members' curves are drawn one after another on its step axis, the same step budget.

Every report with units also writes them to recon_units.json (`save_units`), so that a later run can draw
them as its comparison: `quantize --method carsam --report B --report-compare A` after `quantize --method recon
--report A` (`load_units`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import InputError
from ..modelio import write_json
from .report import ReportContext, Section, md_table

UNITS_FILE = "recon_units.json"
_FIELDS = ("name", "kind", "iters", "loss_start", "loss_end", "kept")

COLOURS = ("#1f77b4", "#d62728")
MAX_PANELS = 60


def _curve(u) -> np.ndarray | None:
    c = getattr(u, "curve", None)
    if c is None:
        return None
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    return c if c.size else None


def _steps(u, n: int) -> np.ndarray:
    """Step index of each of the n curve points: the curve covers steps 0..iters evenly."""
    iters = int(getattr(u, "iters", 0) or 0)
    if n == 1:
        return np.zeros(1)
    return np.linspace(0, max(iters - 1, n - 1) if iters else n - 1, n)


def save_units(folder: Path, units: list, label: str) -> Path:
    """The units' names, steps, losses and curves as JSON (the comparison input of a later report)."""
    rows = [{**{k: getattr(u, k, None) for k in _FIELDS}, "members": list(getattr(u, "members", ()) or ()),
             "curve": [float(x) for x in (_curve(u) if _curve(u) is not None else ())]} for u in units]
    return write_json(Path(folder) / UNITS_FILE, {"label": label, "units": rows}, force=True)


def load_units(path) -> tuple[str, list]:
    """(label, unit records) from a report folder or its recon_units.json; a one-line InputError otherwise."""
    path = Path(path)
    file = path / UNITS_FILE if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
        units = [SimpleNamespace(**{k: u.get(k) for k in _FIELDS}, members=tuple(u.get("members") or ()),
                                 curve=tuple(float(x) for x in u.get("curve") or ())) for u in data["units"]]
        for u in units:
            if not isinstance(u.name, str):
                raise ValueError("a unit without a name")
            u.iters, u.loss_start, u.loss_end = int(u.iters), float(u.loss_start), float(u.loss_end)
        return str(data.get("label") or file.parent.name), units
    except FileNotFoundError:
        raise InputError(f"--report-compare {path}: no {UNITS_FILE} there (write it with quantize --method "
                         f"recon|carsam --report DIR)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"--report-compare {file}: not a {UNITS_FILE} of a report ({e})") from None


def _member_curves(joint, other: dict) -> list:
    """The records in `other` of a joint unit's members, when every member is there with a curve."""
    ms = [other.get(m) for m in getattr(joint, "members", ()) or ()]
    return ms if ms and all(m is not None and _curve(m) is not None for m in ms) else []


def _draw(ax, steps: np.ndarray, c: np.ndarray, colour: str, label: str | None = None) -> None:
    """One curve: every step faint (one batch each) and its running mean over 5% of the steps in bold."""
    pos = c > 0
    ax.plot(steps[pos], c[pos], color=colour, linewidth=0.5, alpha=0.3)
    w = max(1, c.size // 20)
    if w > 1 and c.size > w:
        sm = np.convolve(c, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:][sm > 0], sm[sm > 0], color=colour, linewidth=1.2, label=label)
    else:
        ax.plot(steps[pos], c[pos], color=colour, linewidth=1.2, label=label)


def _wrap(name: str, width: int = 34) -> str:
    """A unit name on at most two lines, broken after a / or . separator (the middle cut out if still long)."""
    if len(name) <= width:
        return name
    cut = max(name.rfind("/", 0, width), name.rfind(".", 0, width))
    head, tail = (name[: cut + 1], name[cut + 1:]) if cut > 0 else (name[:width], name[width:])
    if len(tail) > width:
        tail = "..." + tail[-(width - 3):]
    return f"{head}\n{tail}"


def recon_curves_section(ctx: ReportContext) -> Section | None:
    lists = [list(ctx.extra.get("recon_units") or [])]
    if ctx.extra.get("recon_compare"):
        lists.append(list(ctx.extra["recon_compare"]))
    if not lists[0] and len(lists) == 1:
        return None
    labels = list(ctx.extra.get("recon_labels") or ())
    names = (labels + ["this run", "compare"][len(labels):])[: len(lists)]
    order: list[str] = []
    by = [dict() for _ in lists]
    for i, units in enumerate(lists):
        for u in units:
            by[i][u.name] = u
            if u.name not in order:
                order.append(u.name)
    if ctx.extra.get("recon_units"):
        save_units(ctx.folder, lists[0], names[0])
    shared = {}      # panel name -> (list index, member records in sequence) for joint units
    for i, b in enumerate(by):
        for n, u in b.items():
            for j in range(len(by)):
                ms = _member_curves(u, by[j]) if j != i and n not in by[j] else []
                if ms:
                    shared[n] = (j, ms)
    absorbed = {m.name for _, ms in shared.values() for m in ms}
    for n, (_, ms) in shared.items():     # the members' rows follow their joint unit's
        order = [x for x in order if x not in {m.name for m in ms}]
        at = order.index(n) + 1
        order[at:at] = [m.name for m in ms]
    plotted = [n for n in order if n not in absorbed and (n in shared or any(n in b and _curve(b[n]) is not None
                                                                              for b in by))]
    rows = []
    for n in order:
        for i, b in enumerate(by):
            u = b.get(n)
            if u is None:
                continue
            ratio = u.loss_end / u.loss_start if u.loss_start else float("nan")
            rows.append((f"`{n}`", names[i], u.kind, u.iters, f"{u.loss_start:.4g}", f"{u.loss_end:.4g}",
                         f"{ratio:.3f}", "yes" if _curve(u) is not None else "no"))
    table = md_table(rows, ("unit", "run", "kind", "steps", "first loss", "last loss", "last / first", "curve"))
    if not plotted:
        return Section("Reconstruction loss per unit", "No unit recorded a loss curve; first and last loss:\n\n"
                       + table)
    shown = plotted[:MAX_PANELS]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(6, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.7 * ncols + 0.5, 2.4 * nrows + 1.0), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, n in zip(axes.flat, shown):
        for i, b in enumerate(by):
            u = b.get(n)
            c = None if u is None else _curve(u)
            if c is None:
                continue
            _draw(ax, _steps(u, c.size), c, COLOURS[i % len(COLOURS)], names[i])
        if n in shared:             # the joint unit's members, one after another on its step axis
            j, ms = shared[n]
            start = 0
            for m in ms:
                c = _curve(m)
                _draw(ax, start + _steps(m, c.size), c, COLOURS[j % len(COLOURS)])
                start += int(m.iters or c.size)
                ax.axvline(start, color="grey", linewidth=0.5, linestyle=":")
        ax.set_yscale("log")
        ax.set_title(_wrap(n), fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("step", fontsize=7, labelpad=1)
    for ax in axes[:, 0]:
        ax.set_ylabel("loss (log)", fontsize=7)
    handles = [plt.Line2D([], [], color=COLOURS[i % len(COLOURS)]) for i in range(len(lists))]
    fig.legend(handles, names, loc="upper right", fontsize=8, ncol=len(lists))
    fig.suptitle("Reconstruction loss per unit (one panel per unit, graph order; log scale; faint: every step, "
                 "bold: running mean over 5% of the steps)"
                 + (f"; first {MAX_PANELS} of {len(plotted)} units" if len(plotted) > MAX_PANELS else ""),
                 fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97 if nrows > 2 else 0.93))
    png = "recon_loss_curves.png"
    fig.savefig(ctx.folder / png, dpi=90)
    plt.close(fig)
    what = " and ".join(f"{names[i]} ({'blue' if i == 0 else 'red'})" for i in range(len(lists)))
    md = (f"![Reconstruction loss per unit]({png})\n\n"
          f"*{png}: the reconstruction loss of each unit against its optimisation step (log scale), {what}; "
          f"units are the blocks optimised together, in graph order. A curve that rises and falls instead of "
          f"settling is the oscillation joint reconstruction is meant to remove."
          + (f" A joint unit's panel also holds its members reconstructed one by one ({', '.join(sorted(shared))}):"
             f" their curves follow each other (dotted lines between them), the same number of steps in all."
             if shared else "") + "*\n\n" + table)
    return Section("Reconstruction loss per unit", md, [png])


SECTIONS = (recon_curves_section,)
