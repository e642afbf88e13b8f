"""`quantize --report DIR`: report.md and PNGs showing what quantization did.

The report is a list of sections. Each section is a function `section(ctx: ReportContext) -> Section | None`
(None: nothing to show for this model) that may write PNGs into ctx.folder; `write_report` runs them in order
and joins their markdown. `DEFAULT_SECTIONS` holds the built-in ones; other features add theirs by passing a
longer list or with `register_section` (e.g. attention entropy / attention maps, issue 12).

Built-in sections:
- summary: what was quantized, the output SQNR on held-out prompts, sizes;
- weight SQNR per layer (quantized weight vs float), a bar chart in graph order (input to output = depth);
- activation SQNR per quantized activation, each quantized alone on the FP model's values over the held-out
  inputs (torch executor, the same Q/DQ arithmetic as the graph), bar chart in graph order;
- masks: FP vs quantized mask of each held-out prompt overlaid on its image (model input frame), with their IoU.

Registered from their own modules when the package is imported (deploy/__init__.py), after these: attention
dissipation, Q.K^T error before/after MAC and attention maps (report_attention.py), reconstruction loss
curves per unit (report_recon.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..errors import OutputError
from ..qmath import sqnr_db, sqnr_from_sums

REPORT_NAME = "report.md"


@dataclass
class Section:
    title: str
    markdown: str
    images: list[str] = field(default_factory=list)     # PNG file names inside the report folder


@dataclass
class ReportContext:
    folder: Path
    fp_path: Path
    q_path: Path
    fp_model: onnx.ModelProto          # the graph that was quantized (opset-converted if it had to be)
    q_model: onnx.ModelProto
    plan: object                       # passes.sites.QuantPlan
    artifact: object                   # artifact.CalibrationArtifact
    held_feeds: list[dict]             # model inputs of the held-out prompts
    held_samples: list                 # data.prompts.CalibSample (their images and boxes)
    summary_lines: list[str]
    provider: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)   # for sections that need more (attention maps...)


SectionFn = Callable[[ReportContext], "Section | None"]


def check_report_dir(folder, force: bool) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--report {folder} exists and is not a folder")
    if (folder / REPORT_NAME).exists() and not force:
        raise OutputError(f"{folder / REPORT_NAME} exists; pass --force to overwrite it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {folder}: {e.strerror or e}") from None
    return folder


# ---- helpers ----------------------------------------------------------------------------------------------------
def _node_order(model: onnx.ModelProto) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(model.graph.node)}


def _group(name: str) -> str:
    for key in ("image_encoder", "prompt_encoder", "mask_decoder"):
        if key in name or key.replace("_", "") in name.replace("_", ""):
            return key
    return "other"


COLOURS = {"image_encoder": "#1f77b4", "mask_decoder": "#ff7f0e", "prompt_encoder": "#2ca02c", "other": "#7f7f7f"}


def _bar_chart(path: Path, names: list[str], values: list[float], title: str, ylabel: str, *,
               xlabel: str = "layer, in graph order (input -> output)", hatched: list[bool] | None = None,
               hatch_label: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [v if np.isfinite(v) else np.nan for v in values]
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.12 * len(values) + 2, 24.0)), 4.0))
    colours = [COLOURS[_group(n)] for n in names]
    bars = ax.bar(range(len(values)), finite, color=colours, width=0.8)
    marked = hatched is not None and any(hatched)
    if marked:
        for bar, h in zip(bars, hatched):
            if h:
                bar.set_hatch("///")
                bar.set_edgecolor("white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(-1, len(values))
    groups = {_group(n) for n in names}
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for g, c in COLOURS.items() if g in groups]
    labels = [g.replace("_", " ") for g in COLOURS if g in groups]
    if marked:
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="#bbbbbb", hatch="///", edgecolor="white"))
        labels.append(hatch_label)
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def md_table(rows: list[tuple], header: tuple) -> str:
    """A Markdown table of `rows` under `header`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _worst(rows: list[tuple[str, float]], n: int = 5) -> str:
    worst = sorted(rows, key=lambda r: r[1])[:n]
    return md_table([(f"`{name}`", f"{v:.1f}") for name, v in worst], ("layer", "SQNR (dB)"))


# ---- sections ---------------------------------------------------------------------------------------------------
def summary_section(ctx: ReportContext) -> Section:
    text = "\n".join(f"- {line}" for line in ctx.summary_lines)
    return Section("Summary", f"FP model `{ctx.fp_path.name}`, quantized model `{ctx.q_path.name}`.\n\n{text}")


def weight_sqnr_section(ctx: ReportContext) -> Section | None:
    from onnx import numpy_helper

    from ..qmath import dequantize_weight, quantize_weight

    inits = {t.name: t for t in ctx.fp_model.graph.initializer}
    order = _node_order(ctx.fp_model)
    rows = []
    for site in sorted(ctx.plan.weights, key=lambda s: order.get(s.node, 0)):
        wq = ctx.artifact.weights.get(site.initializer)
        if wq is None or site.initializer not in inits:
            continue
        w = numpy_helper.to_array(inits[site.initializer]).astype(np.float32)
        w_fp = ctx.artifact.float_weights.get(site.initializer, w)
        rows.append((site.node, sqnr_db(w, dequantize_weight(quantize_weight(np.asarray(w_fp), wq), wq)), wq.bits,
                     site.kind.value))
    if not rows:
        return None
    png = "weight_sqnr.png"
    layer_bits = sorted({r[2] for r in rows if r[3] != "constant"})
    const_bits = sorted({r[2] for r in rows if r[3] == "constant"})
    _bar_chart(ctx.folder / png, [r[0] for r in rows], [r[1] for r in rows],
               f"Weight SQNR per layer ({len(rows)} quantized weights; layers "
               f"{'/'.join(map(str, layer_bits)) or '-'}-bit)", "SQNR (dB), quantized vs float weight",
               xlabel="weight, in graph order (input -> output)", hatched=[r[3] == "constant" for r in rows],
               hatch_label=f"constant tables ({'/'.join(map(str, const_bits))}-bit, weight-only)")
    md = (f"![Weight SQNR per layer, in graph order]({png})\n\n"
          f"*{png}: SQNR of each quantized weight against its float value (10 log10 of signal over quantization "
          f"noise), one bar per weight layer in graph order; colour = part of SAM; hatched = large float constants "
          f"that are no layer weight (position embeddings, relative-position tables), stored per channel as "
          f"weight-only INT8.* Median "
          f"{np.median([r[1] for r in rows]):.1f} dB. Lowest:\n\n" + _worst([(r[0], r[1]) for r in rows]))
    return Section("Weight SQNR per layer", md, [png])


def activation_sqnr_section(ctx: ReportContext) -> Section | None:
    import torch
    from tqdm.auto import tqdm

    from ..calib.baseline import to_torch
    from ..torchexec.module import OnnxModule
    from ..qmath import fake_quant_activation

    acts = [a for a in ctx.plan.activations if a.value in ctx.artifact.activations]
    if not acts:
        return Section("Activation SQNR per layer", "Activations stay float (a16): no activation quantization.")
    module = OnnxModule(ctx.fp_model).eval()
    sums = {a.value: [0.0, 0.0] for a in acts}   # signal, noise

    def hook(value):
        aq = ctx.artifact.activations[value]

        def fn(t):
            x = t.detach().float().cpu().numpy()
            sums[value][0] += float(np.sum(x.astype(np.float64) ** 2))
            sums[value][1] += float(np.sum((x.astype(np.float64) - fake_quant_activation(x, aq)) ** 2))
        return fn

    with torch.no_grad(), module.value_hooks({a.value: hook(a.value) for a in acts}):
        for feed in tqdm(ctx.held_feeds, desc="report: activation SQNR", unit="img", leave=False,
                         disable=not ctx.progress or None):
            module.run(to_torch(feed, "cpu"))
    order = {v: i for i, n in enumerate(ctx.fp_model.graph.node) for v in n.output}
    rows = []
    for a in sorted(acts, key=lambda a: order.get(a.value, -1)):
        s, n = sums[a.value]
        consumer = a.consumers[0] if getattr(a, "consumers", None) else ""
        label = f"{a.value} ({a.kind.value}) -> {consumer}"
        rows.append((label, sqnr_from_sums(s, n)))
    png = "activation_sqnr.png"
    bits = sorted({ctx.artifact.activations[a.value].bits for a in acts})
    _bar_chart(ctx.folder / png, [r[0] for r in rows], [r[1] for r in rows],
               f"Activation SQNR per quantized activation ({len(rows)} activations, "
               f"{'/'.join(map(str, bits))}-bit), each quantized alone", "SQNR (dB), Q/DQ vs float",
               xlabel="quantized activation, in graph order (input -> output)")
    md = (f"![Activation SQNR per quantized activation, in graph order]({png})\n\n"
          f"*{png}: SQNR of each quantized activation (layer inputs and both inputs of the attention MatMuls), "
          f"each quantized alone on the FP model's values over {len(ctx.held_feeds)} held-out inputs, in graph "
          f"order; colour = part of SAM.* Median {np.median([r[1] for r in rows]):.1f} dB. Lowest:\n\n"
          + _worst(rows))
    return Section("Activation SQNR per layer", md, [png])


def sample_image(sample) -> np.ndarray:
    """The preprocessed [1, 3, S, S] input back to uint8 RGB, cropped to the resized image (padding removed)."""
    from ..data.preprocess import PIXEL_MEAN, PIXEL_STD

    x = sample.image[0]
    rows = np.nonzero(np.abs(x).sum((0, 2)) > 0)[0]
    cols = np.nonzero(np.abs(x).sum((0, 1)) > 0)[0]
    h, w = (rows[-1] + 1, cols[-1] + 1) if len(rows) and len(cols) else x.shape[1:]
    rgb = x.transpose(1, 2, 0) * PIXEL_STD + PIXEL_MEAN
    return rgb[:h, :w].clip(0, 255).astype(np.uint8)


def _best_mask(out: dict, size: int) -> np.ndarray:
    from ..data.preprocess import Geometry, postprocess_masks

    low = np.asarray(out["low_res_masks"], np.float32)
    low = low.reshape(-1, *low.shape[-2:])
    q = np.asarray(out["iou_predictions"]).reshape(-1)
    j = int(np.argmax(q)) if q.size > 1 else 0
    return postprocess_masks(low[j:j + 1], Geometry((size, size), (size, size), size))[0]


def mask_overlay_section(ctx: ReportContext) -> Section | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runtime import OrtRuntime
    from ..runtime.providers import ort_runtime_for

    if "low_res_masks" not in {o.name for o in ctx.q_model.graph.output}:
        return Section("Masks: FP vs quantized", "The model is an image encoder: it gives no masks to compare "
                       "(its output SQNR is in the summary). Quantize the full model or the decoder to see masks.")
    rt = ort_runtime_for(ctx.provider) if ctx.provider else OrtRuntime()
    fp = rt.session(ctx.fp_path, "FP model")
    q = rt.session(ctx.q_path, "quantized model")
    n = min(len(ctx.held_feeds), MASK_PANELS)
    fig, axes = plt.subplots(n, 3, figsize=(11, 4.2 * n), squeeze=False)
    ious = []
    for i, (feed, sample) in enumerate(zip(ctx.held_feeds, ctx.held_samples)):
        image = sample_image(sample)
        size = sample.image.shape[-1]
        masks = [_best_mask(s.run(feed), size)[: image.shape[0], : image.shape[1]] for s in (fp, q)]
        inter, union = np.logical_and(*masks).sum(), np.logical_or(*masks).sum()
        iou = float(inter / union) if union else 1.0
        ious.append(iou)
        if i >= n:                                   # the table lists every prompt, the figure the first few
            continue
        (x0, y0), (x1, y1) = sample.point_coords[0][:2]
        grey = np.repeat(image.astype(np.float32).mean(-1, keepdims=True), 3, -1)
        for ax, m, name in zip(axes[i][:2], masks, ("FP", "quantized")):
            tint = grey.copy()
            tint[m] = 0.45 * tint[m] + 0.55 * np.array([0, 200, 255])
            ax.imshow(tint.astype(np.uint8))
            if m.any():
                ax.contour(m.astype(np.float32), levels=[0.5], colors="yellow", linewidths=1.0)
            ax.set_title(f"{sample.source}: {name} mask", fontsize=9)
        diff = grey * 0.6
        only_fp, only_q = masks[0] & ~masks[1], masks[1] & ~masks[0]
        diff[masks[0] & masks[1]] = (200, 200, 200)
        diff[only_fp] = (230, 40, 40)
        diff[only_q] = (40, 90, 255)
        axes[i][2].imshow(diff.astype(np.uint8))
        axes[i][2].set_title(f"IoU {iou:.3f}; grey: both, red: FP only ({int(only_fp.sum())} px),\n"
                             f"blue: quantized only ({int(only_q.sum())} px)", fontsize=9)
        for ax in axes[i]:
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", linewidth=1.5))
            ax.axis("off")
    fig.suptitle("Masks of the held-out box prompts (green box), FP vs quantized, on the model's input frame "
                 "(image shown in grey)", fontsize=10)
    fig.tight_layout()
    png = "masks_fp_vs_quantized.png"
    fig.savefig(ctx.folder / png, dpi=90)
    plt.close(fig)
    rows = [(s.source, f"{iou:.4f}") for s, iou in zip(ctx.held_samples, ious)]
    which = "each" if n == len(ious) else f"each of the first {n} (of {len(ious)}; the table has all)"
    md = (f"![FP vs quantized masks on held-out images]({png})\n\n"
          f"*{png}: for {which} held-out image and its box prompt (green), the FP model's mask (left) and the "
          f"quantized model's mask (middle), cyan with a yellow outline over the image in grey, in the model's "
          f"input frame; right: where they agree (grey) and differ (red: FP only, blue: quantized only), with "
          f"the IoU of the two masks.*\n\n" + md_table(rows, ("image", "mask IoU, quantized vs FP")))
    if len(ious) > 1:
        md += f"\n\nMean mask IoU over the {len(ious)} held-out prompts: {float(np.mean(ious)):.4f}."
    return Section("Masks: FP vs quantized", md, [png])


MASK_PANELS = 4   # held-out prompts drawn in the masks figure (all of them are in its table)


DEFAULT_SECTIONS: list[SectionFn] = [summary_section, weight_sqnr_section, activation_sqnr_section,
                                     mask_overlay_section]


def register_section(fn: SectionFn, before: SectionFn | None = None) -> None:
    """Add a section to every report written from now on (at the end, or before `before`)."""
    if before is not None and before in DEFAULT_SECTIONS:
        DEFAULT_SECTIONS.insert(DEFAULT_SECTIONS.index(before), fn)
    else:
        DEFAULT_SECTIONS.append(fn)


def write_report(ctx: ReportContext, sections: list[SectionFn] | None = None) -> Path:
    from tqdm.auto import tqdm

    parts = [f"# Quantization report: {ctx.q_path.name}\n"]
    for fn in tqdm(sections or DEFAULT_SECTIONS, desc="report", unit="section", leave=False,
                   disable=not ctx.progress or None):
        sec = fn(ctx)
        if sec is not None:
            parts.append(f"## {sec.title}\n\n{sec.markdown}\n")
    path = ctx.folder / REPORT_NAME
    tmp = path.with_name(f".{REPORT_NAME}.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path


def write_quant_report(folder, fp_path, q_path, fp_model, q_model, plan, artifact, held_feeds, report, *,
                       held_samples, provider=None, progress=True, extra: dict | None = None) -> Path:
    """extra: ReportContext.extra (recon_units, recon_compare, baseline...: see the sections' modules)."""
    ctx = ReportContext(Path(folder), Path(fp_path), Path(q_path), fp_model, q_model, plan, artifact,
                        held_feeds, held_samples, [x for x in report.lines() if not x.startswith("time:")],
                        provider, progress, dict(extra or {}))
    return write_report(ctx)
