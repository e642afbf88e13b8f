"""Report sections on attention (issue 12: what CAR-SAM fixes), added to deploy/report.py's list on import
(deploy/__init__.py imports this module, so every report has them).

- attention dissipation: per attention site, the mean normalised entropy of the attention probabilities and
  their mean top-k mass, for the FP model, the baseline (ctx.extra["baseline"], a CalibrationArtifact, when
  given) and this run; a quantized Q.K^T makes the softmax diffuse (entropy up, top-k mass down);
- Q.K^T relative error per site before and after MAC (only when the artifact holds float_weights): measured on
  the held-out inputs for a MAC-only artifact, and MAC's own record on its check images (artifact info) after
  reconstruction, which re-learns the corrected weights' rounding;
- attention maps: the final token->image attention of the first held-out prompt over its image, FP /
  baseline / this run side by side.

Entropy, top-k mass and maps are measured on the emitted Q/DQ graphs run by the torch executor over the
held-out inputs: ctx.q_model for this run, the baseline artifact emitted on this run's plan, i.e. exactly
what ships. (An earlier calib.mac.graph.QuantSim quantized an activation for all its consumers and drifted from
the deployed graph by up to 0.023 in normalised entropy on the reference model; it now quantizes for the listed
consumers only, but the report keeps measuring the files themselves.) The probabilities are read as the
Softmax computes them, before their own Q/DQ: that isolates the
effect of the quantized Q and K (and everything upstream) from the rounding of the probabilities themselves.

The Q.K^T error section uses calib.mac.qk_error as MAC does (its QuantSim simulation), so that it
shows what MAC optimised.

Definitions, per attention row p (one query, one head) over N keys:
    entropy  = -sum_j p_j log p_j / log N      (0: all mass on one key, 1: uniform)
    top-k mass = sum of the k largest p_j, k = max(1, floor(N / 100))
averaged over every query, head, batch item and held-out input.

ctx.extra keys read here: "baseline" (CalibrationArtifact), "baseline_label" (str, default "baseline").
The FP torch module and the runs are cached in ctx.extra under "_attention_cache" (shared by the sections).
"""
from __future__ import annotations

import math

import numpy as np

from ..passes.sites import Role
from .report import ReportContext, Section, md_table, sample_image

ROLE_SHORT = {
    Role.ENCODER_WINDOW: "enc window",
    Role.ENCODER_GLOBAL: "enc global",
    Role.DECODER_SELF: "dec self",
    Role.DECODER_TOKEN_TO_IMAGE: "dec token->image",
    Role.DECODER_IMAGE_TO_TOKEN: "dec image->token",
    Role.DECODER_FINAL_TOKEN_TO_IMAGE: "dec final token->image",
}
RUN_COLOURS = {"FP": "#555555", "baseline": "#ff7f0e", "this run": "#1f77b4"}
CACHE_KEY = "_attention_cache"
MAP_TOKEN = 1     # the first mask token (SAM's output tokens: IoU token, mask tokens, prompt tokens)


def site_label(site) -> str:
    role = ROLE_SHORT.get(site.role, str(getattr(site.role, "value", site.role)))
    return role if site.block is None else f"{role} {site.block}"


def top_k(n_keys: int) -> int:
    return max(1, n_keys // 100)


def row_stats(p) -> tuple[float, float, int]:
    """(sum of normalised entropies, sum of top-k masses, number of rows) of probabilities p [..., N] (torch),
    in float64, a few million elements at a time (a vit_b global attention holds 200M probabilities)."""
    import torch

    rows = p.detach().reshape(-1, p.shape[-1])
    n = rows.shape[-1]
    if n < 2:
        return 0.0, float(rows.shape[0]), rows.shape[0]
    k = top_k(n)
    ent = top = 0.0
    for chunk in rows.split(max(1, (1 << 22) // n)):
        c = chunk.double()
        ent += float(-(c * torch.log(c.clamp_min(1e-300))).sum()) / math.log(n)
        top += float(c.topk(k, dim=-1).values.sum())
    return ent, top, rows.shape[0]


def _label_of(artifact, default: str) -> str:
    info = getattr(artifact, "info", {}) or {}
    parts = [info[k] for k in ("method", "bits") if info.get(k)]
    return f"{default} ({', '.join(parts)})" if parts else default


def _cache(ctx: ReportContext) -> dict:
    return ctx.extra.setdefault(CACHE_KEY, {})


def _module(model):
    from ..torchexec import OnnxModule

    module = OnnxModule(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _fp_module(ctx: ReportContext):
    cache = _cache(ctx)
    if "module" not in cache:
        cache["module"] = _module(ctx.fp_model)
    return cache["module"]


def _runs(ctx: ReportContext) -> tuple[list[tuple[str, str, object]], list[str]]:
    """([(key, legend label, Q/DQ model or None for FP)], notes) of the models to compare: FP, the baseline
    artifact emitted on this run's plan (when ctx.extra has one), this run's emitted model."""
    from ..errors import CarsamError
    from ..passes.emit import emit_qdq

    runs, notes = [("FP", "FP", None)], []
    base = ctx.extra.get("baseline")
    if base is not None:
        label = _label_of(base, ctx.extra.get("baseline_label", "baseline"))
        try:
            runs.append(("baseline", label, emit_qdq(ctx.fp_model, ctx.plan, base,
                                                     float_activations=not base.activations)))
        except CarsamError as e:
            notes.append(f"The baseline ({label}) is left out: its calibration does not fit this run's plan ({e}).")
    runs.append(("this run", _label_of(ctx.artifact, "this run"), ctx.q_model))
    return runs, notes


def _final_site(ctx: ReportContext):
    finals = [s for s in ctx.plan.attention if s.role == Role.DECODER_FINAL_TOKEN_TO_IMAGE]
    return finals[-1] if finals else None


class _Observer:
    """Hooks on every site's probabilities: running sums of entropy and top-k mass, and the final
    token->image row (MAP_TOKEN, mean over heads) of the first input's first batch item."""

    def __init__(self, sites, final):
        self.sums = {s.probs_value: [0.0, 0.0, 0, 0] for s in sites}     # entropy, top-k, rows, keys
        self.final = None if final is None else final.probs_value
        self.feed_index = 0
        self.map = None

    def hooks(self) -> dict:
        return {v: self._hook(v) for v in self.sums}

    def _hook(self, value: str):
        def fn(p):
            e, t, n = row_stats(p)
            acc = self.sums[value]
            acc[0] += e
            acc[1] += t
            acc[2] += n
            acc[3] = p.shape[-1]
            if value == self.final and self.feed_index == 0:
                tok = MAP_TOKEN if p.shape[-2] > MAP_TOKEN else 0
                self.map = p[0, :, tok, :].detach().double().mean(0).numpy()
            return None
        return fn

    def stats(self) -> dict:
        return {v: (a[0] / a[2], a[1] / a[2], a[3]) for v, a in self.sums.items() if a[2]}


def attention_runs(ctx: ReportContext) -> dict:
    """{run key: {"label", "stats": {probs value: (entropy, top-k mass, keys)}, "map": [H*W] or None}} and
    "notes": [str], each model run once over the held-out inputs (cached in ctx.extra)."""
    cache = _cache(ctx)
    if "runs" in cache:
        return cache["runs"]
    import torch
    from tqdm.auto import tqdm

    from ..calib.baseline import to_torch

    sites = list(ctx.plan.attention)
    final = _final_site(ctx)
    runs, notes = _runs(ctx)
    out = {"notes": notes}
    for key, label, model in runs:
        module = _fp_module(ctx) if model is None else _module(model)
        obs = _Observer(sites, final)
        with torch.no_grad():
            for i, feed in enumerate(tqdm(ctx.held_feeds, desc=f"report: attention ({key})", unit="img",
                                          leave=False, disable=not ctx.progress or None)):
                obs.feed_index = i
                module.run(to_torch(feed, "cpu"), replace=obs.hooks())
        out[key] = {"label": label, "stats": obs.stats(), "map": obs.map}
    cache["runs"] = out
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(ax, labels: list[str], series: list[tuple[str, list[float], str]], ylabel: str) -> None:
    n = len(series)
    width = 0.8 / n
    x = np.arange(len(labels))
    for i, (name, values, colour) in enumerate(series):
        ax.bar(x + (i - (n - 1) / 2) * width, values, width, label=name, color=colour)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


# ---- sections ---------------------------------------------------------------------------------------------------
def attention_dissipation_section(ctx: ReportContext) -> Section | None:
    if not ctx.plan.attention:
        return None
    runs = attention_runs(ctx)
    notes = runs["notes"]
    runs = {k: v for k, v in runs.items() if k != "notes"}
    sites = [s for s in ctx.plan.attention if s.probs_value in runs["FP"]["stats"]]
    if not sites:
        return None
    keys = list(runs)
    labels = [site_label(s) for s in sites]
    plt = _plt()
    quant = keys[1:]
    fig, axes = plt.subplots(4, 1, figsize=(max(8.0, 0.3 * len(sites) * len(keys) + 4), 12.0), sharex=True,
                             gridspec_kw={"height_ratios": (3, 2, 3, 2)})
    for row, (idx, what, ylabel) in enumerate(((0, "entropy", "mean normalised entropy\n(0: one key, 1: uniform)"),
                                               (1, "top-k mass", "mean top-k mass\n(k = 1% of keys, >= 1)"))):
        ax, dax = axes[2 * row], axes[2 * row + 1]
        _grouped_bars(ax, labels, [(runs[k]["label"], [runs[k]["stats"][s.probs_value][idx] for s in sites],
                                    RUN_COLOURS[k]) for k in keys], ylabel)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{what} per site", fontsize=9, loc="left")
        _grouped_bars(dax, labels, [(runs[k]["label"], [runs[k]["stats"][s.probs_value][idx]
                                                        - runs["FP"]["stats"][s.probs_value][idx] for s in sites],
                                     RUN_COLOURS[k]) for k in quant], f"{what}\nminus FP")
        dax.axhline(0.0, color="black", linewidth=0.8)
        dax.set_title(f"{what} of the quantized model(s) minus FP's ("
                      + ("dissipation: above 0" if idx == 0 else "dissipation: below 0") + ")",
                      fontsize=9, loc="left")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(f"Attention dissipation per attention site (graph order), over {len(ctx.held_feeds)} held-out "
                 f"input(s):\na diffuse softmax has higher entropy and lower top-k mass than FP", fontsize=10)
    axes[-1].set_xlabel("attention site (role, block / layer index)")
    fig.tight_layout()
    png = "attention_dissipation.png"
    fig.savefig(ctx.folder / png, dpi=100)
    plt.close(fig)
    header = ("site", "keys N", "k") + tuple(f"entropy {runs[k]['label']}" for k in keys) + \
        tuple(f"top-k mass {runs[k]['label']}" for k in keys)
    rows = []
    for s, label in zip(sites, labels):
        st = {k: runs[k]["stats"][s.probs_value] for k in keys}
        n = st["FP"][2]
        rows.append((f"{label} (`{s.softmax}`)", n, top_k(n), *(f"{st[k][0]:.4f}" for k in keys),
                     *(f"{st[k][1]:.4f}" for k in keys)))
    gaps = []
    for k in keys[1:]:
        de = np.mean([runs[k]["stats"][s.probs_value][0] - runs["FP"]["stats"][s.probs_value][0] for s in sites])
        dt = np.mean([runs[k]["stats"][s.probs_value][1] - runs["FP"]["stats"][s.probs_value][1] for s in sites])
        gaps.append(f"{runs[k]['label']}: entropy {de:+.4f}, top-k mass {dt:+.4f} (mean over sites, minus FP)")
    md = (f"![Attention entropy and top-k mass per attention site]({png})\n\n"
          f"*{png}: for each attention site in graph order, the mean normalised entropy of its attention "
          f"probabilities (first panel; -sum p log p / log N over the N keys of a row: 0 = all mass on one key, "
          f"1 = uniform) and the mean mass of its k largest probabilities (third panel; k = max(1, floor(N/100))), "
          f"over every query row, head and the {len(ctx.held_feeds)} held-out input(s), one bar per model; the "
          f"second and fourth panels give each quantized model's value minus FP's (dissipation: entropy above "
          f"0, top-k mass below 0). The probabilities "
          f"are read as the Softmax computes them, before their own Q/DQ.*\n\n"
          + "".join(f"{n}\n\n" for n in notes) + "\n".join(f"- {g}" for g in gaps) + "\n\n" + md_table(rows, header))
    return Section("Attention dissipation per site", md, [png])


def parse_mac_record(text: str) -> dict[str, tuple[float, float, str]]:
    """Artifact info "mac_check_qk_error" ("role:block before->after k=.. v=..; ...", calib/mac/__init__.py mac_info)
    -> {"role:block": (before, after, "k=.. v=..")}."""
    out = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        key, errs, *steps = entry.split()
        before, after = errs.split("->")
        out[key] = (float(before), float(after), " ".join(steps))
    return out


def _qk_bars(ctx: ReportContext, labels: list[str], before: list[float], after: list[float], title: str,
             png: str) -> int:
    """Grouped before/after bars of Q.K^T relative error (%) per site into `png`; returns the sites changed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(labels) + 3), 4.5))
    _grouped_bars(ax, labels, [("before MAC (uncorrected float weights)", before, "#ff7f0e"),
                               ("after MAC (corrected float weights)", after, "#1f77b4")],
                  "relative error of Q.K^T (%)\n||QK^T - Q^K^^T|| / ||QK^T||")
    changed = sum(1 for x, y in zip(before, after) if abs(y - x) > 1e-9)
    ax.set_title(f"{title};\nMAC changed {changed} of {len(labels)} sites")
    ax.set_xlabel("attention site (role, block / layer index)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.folder / png, dpi=100)
    plt.close(fig)
    return changed


def qk_error_section(ctx: ReportContext) -> Section | None:
    fw = dict(getattr(ctx.artifact, "float_weights", {}) or {})
    if not fw or not ctx.plan.attention:
        return None
    weights = getattr(ctx.artifact, "weights", {})
    if any(getattr(weights.get(k), "values", None) is not None for k in fw):
        # After reconstruction the corrected projections carry AdaRound's integers: "without MAC" would not be
        # the model MAC started from. What MAC measured at its own step is in the artifact's info.
        return _mac_record_section(ctx, len(fw))
    from ..calib.mac import qk_error
    from ..calib.mac.graph import QuantSim

    sim = QuantSim(ctx.fp_model, ctx.plan, ctx.artifact)
    before = qk_error(ctx.fp_model, ctx.plan, ctx.artifact, ctx.held_feeds, float_weights={}, sim=sim)
    after = qk_error(ctx.fp_model, ctx.plan, ctx.artifact, ctx.held_feeds, float_weights=fw, sim=sim)
    sites = list(ctx.plan.attention)
    labels = [site_label(s) for s in sites]
    b = [100 * before[s.qk_matmul] for s in sites]
    a = [100 * after[s.qk_matmul] for s in sites]
    png = "qk_error_mac.png"
    corrected = _qk_bars(ctx, labels, b, a, f"Q.K^T relative error per attention site, quantized vs FP, "
                         f"{len(ctx.held_feeds)} held-out input(s)", png)
    rows = [(f"{label} (`{s.qk_matmul}`)", f"{x:.2f}", f"{y:.2f}", f"{y - x:+.2f}")
            for s, label, x, y in zip(sites, labels, b, a)]
    md = (f"![Q.K^T relative error before and after MAC]({png})\n\n"
          f"*{png}: per attention site, the relative error (%) of the attention scores Q.K^T of the quantized "
          f"model (simulated as MAC simulates it: every quantized activation fake-quantized for all its "
          f"consumers) against the FP model, over the {len(ctx.held_feeds)} held-out input(s): with the "
          f"original float weights (before MAC) and with the artifact's corrected float weights (after MAC); "
          f"the weights are quantized on the artifact's grid either way.* {corrected} of {len(sites)} sites "
          f"changed; {len(fw)} corrected tensors.\n\n"
          + md_table(rows, ("site", "before MAC (%)", "after MAC (%)", "change (points)")))
    return Section("Q.K^T error before and after MAC", md, [png])


def _mac_record_section(ctx: ReportContext, n_tensors: int) -> Section | None:
    """A run that reconstructed after MAC: MAC's own record of each site's Q.K^T error on its check images (the
    calibration images it held back), measured on the calibrator's model it corrected."""
    info = getattr(ctx.artifact, "info", {}) or {}
    record = parse_mac_record(info.get("mac_check_qk_error", ""))
    if not record:
        return None
    by_key = {f"{getattr(s.role, 'value', s.role)}:{s.block}": s for s in ctx.plan.attention}
    keys = [k for k in by_key if k in record] + [k for k in record if k not in by_key]
    labels = [site_label(by_key[k]) if k in by_key else k for k in keys]
    b = [100 * record[k][0] for k in keys]
    a = [100 * record[k][1] for k in keys]
    png = "qk_error_mac.png"
    changed = _qk_bars(ctx, labels, b, a, f"Q.K^T relative error per attention site on MAC's "
                       f"{info.get('mac_images', 'check').split(', ')[-1]} images, as MAC measured it", png)
    rows = [(f"{label} (`{by_key[k].qk_matmul}`)" if k in by_key else label, f"{x:.2f}", f"{y:.2f}", f"{y - x:+.2f}",
             record[k][2] or "-") for k, label, x, y in zip(keys, labels, b, a)]
    md = (f"![Q.K^T relative error before and after MAC]({png})\n\n"
          f"*{png}: per attention site MAC corrected, the relative error (%) of the attention scores Q.K^T "
          f"against the FP model on the calibration images MAC held back to judge its corrections "
          f"({info.get('mac_images', '')}), before and after its correction, as MAC measured it on the "
          f"calibrator's model (artifact info `mac_check_qk_error`). The reconstruction that followed re-learned "
          f"the rounding of the corrected weights, so the shipped model's error is not this one; the attention "
          f"dissipation section measures the shipped model.* {changed} of {len(keys)} sites changed; "
          f"{n_tensors} corrected tensors; steps kept: {info.get('mac_steps', '?')}.\n\n"
          + md_table(rows, ("site", "before MAC (%)", "after MAC (%)", "change (points)", "strength kept per step")))
    return Section("Q.K^T error before and after MAC", md, [png])


def attention_map_section(ctx: ReportContext) -> Section | None:
    final = _final_site(ctx)
    if final is None or not ctx.held_feeds or not ctx.held_samples:
        return None
    runs = {k: v for k, v in attention_runs(ctx).items() if k != "notes"}
    maps = {k: r["map"] for k, r in runs.items() if r["map"] is not None}
    if "FP" not in maps:
        return None
    n = maps["FP"].size
    g = math.isqrt(n)
    if g * g != n:
        return Section("Attention maps", f"The final token->image attention has {n} keys, not a square grid: no "
                       "map drawn.")
    sample = ctx.held_samples[0]
    image = sample_image(sample)
    size = sample.image.shape[-1]
    import torch

    plt = _plt()
    keys = list(maps)

    def upsampled(m):
        t = torch.from_numpy(m.reshape(1, 1, g, g))
        up = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        return up.numpy()[: image.shape[0], : image.shape[1]]

    import matplotlib

    grey = image.astype(np.float32).mean(-1)
    vmax = max(float(m.max()) for m in maps.values())
    last = keys[-1]
    diff = maps[last] - maps["FP"]
    dmax = max(float(np.abs(diff).max()), 1e-12)
    ncols = len(keys) + 1
    vmin = min(float(m.min()) for m in maps.values())
    fig, axes = plt.subplots(1, ncols, figsize=(3.6 * ncols + 1.2, 4.4), squeeze=False, layout="constrained")
    axes = axes[0]
    (x0, y0), (x1, y1) = sample.point_coords[0][:2]
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
    cmap = matplotlib.colormaps["inferno"]
    for ax, k in zip(axes, keys):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        level = np.clip(norm(upsampled(maps[k])), 0.0, 1.0)
        rgba = cmap(level)
        rgba[..., 3] = 0.15 + 0.75 * level        # low attention lets the image through
        ax.imshow(rgba)
        e, t, _ = row_stats(torch.from_numpy(maps[k]))
        ax.set_title(f"{runs[k]['label']}\nentropy {e:.3f}, top-k mass {t:.3f}", fontsize=9)
    cb = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[: len(keys)].tolist(), shrink=0.8)
    cb.set_label("attention probability\n(mean over heads)", fontsize=8)
    ax = axes[-1]
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    dim = ax.imshow(upsampled(diff), cmap="coolwarm", alpha=0.75, vmin=-dmax, vmax=dmax)
    ax.set_title(f"{runs[last]['label']} minus FP\n(red: more attention than FP, blue: less)", fontsize=9)
    cb = fig.colorbar(dim, ax=ax, shrink=0.8)
    cb.set_label("probability difference", fontsize=8)
    for ax in axes:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", linewidth=1.5))
        ax.axis("off")
    fig.suptitle(f"{sample.source}: where the first mask token looks in the final token->image attention "
                 f"({g}x{g} image-embedding grid, upsampled over the image); box prompt in green", fontsize=10)
    png = "attention_maps.png"
    fig.savefig(ctx.folder / png, dpi=90)
    plt.close(fig)
    rows = []
    for k in keys:
        e, t, _ = row_stats(torch.from_numpy(maps[k]))
        peak = int(np.argmax(maps[k]))
        rows.append((runs[k]["label"], f"{e:.4f}", f"{t:.4f}", f"{float(maps[k].max()):.4f}",
                     f"({peak % g}, {peak // g})"))
    md = (f"![Final token->image attention of the first held-out prompt]({png})\n\n"
          f"*{png}: the decoder's final token->image attention (`{final.softmax}`) of the first mask token for "
          f"the first held-out prompt ({sample.source}, box in green), mean over heads, on the {g}x{g} image "
          f"embedding grid upsampled bilinearly over the image (grey, model input frame, padding cut); one "
          f"colour scale for these panels (from the smallest to the largest probability among them); the last "
          f"panel is this run's map minus FP's. A dissipated attention spreads over the image instead of the "
          f"object. "
          f"Entropy and top-k mass as in the dissipation section, of this one mean-over-heads row.*\n\n"
          + md_table(rows, ("model", "entropy", "top-k mass", "max probability", "peak cell (x, y)")))
    return Section("Attention maps for one prompt", md, [png])


SECTIONS = (attention_dissipation_section, qk_error_section, attention_map_section)
