"""Reports written into a bundle, from its manifest alone (so any bundle's report can be redrawn).

``report.md``: :func:`bundle_markdown` (target, layers, integer kernels) for every build, plus
:func:`precision_markdown` for ``--precision auto`` builds, whose ``report.html`` with matplotlib
charts :func:`write_html` draws.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

__all__ = ["bundle_markdown", "precision_markdown", "write_html"]

_COLORS = {"int8": "#2b7bba", "int16": "#8e6bbf", "fp16": "#59a14f", "fp32": "#e4572e"}


def _ms(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _time(ms: float) -> str:
    """A plan's latency, readable at any scale."""
    return f"{ms * 1e3:.2f} us" if ms < 0.1 else f"{ms:.3f} ms"


def _fmt(value: float, metric: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if metric == "top1":
        return f"{100 * value:.2f}%"
    if metric == "sqnr":
        return f"{value:.2f} dB"
    return f"{value:.5f}"


def _budget_text(p: dict) -> str:
    if p["metric"] == "sqnr":
        return f"SQNR >= {p['budget']:g} dB vs FP32"
    drop = 100 * p["budget"] if p["metric"] == "top1" else p["budget"]
    unit = " points" if p["metric"] == "top1" else ""
    return f"{p['metric']} drop <= {drop:g}{unit} from FP32"


def _count_summary(s: dict, n: int) -> str:
    extra = [f"+{s[k]} {name}" for k, name in (("int16_layers", "int16"), ("fp16_layers", "fp16")) if s.get(k)]
    return f"{s['int8_layers']} / {n}" + (f" ({', '.join(extra)})" if extra else "")


def _summary_rows(p: dict) -> list[tuple[str, ...]]:
    """(plan, int8 layers, metric, estimated kernel latency, compiled model: metric, latency) rows."""
    n = len(p["layers"])
    lat = p["latency_ms"]
    m = p["metric"]
    race = p.get("race", {})

    def measured(label):
        r = race.get(label)
        if not r:
            return "-", "-"
        ms = "-" if r["measured_ms"] is None else _time(r["measured_ms"])
        return _fmt(r["metric"], m) + ("" if r["passes"] else " (misses)"), ms

    winner = p.get("chosen_from", "exact search")
    mark = lambda label: " <- chosen" if label == winner else ""  # noqa: E731
    return [
        ("FP32", f"0 / {n}", _fmt(p["fp32"], m), _time(lat["fp32"]), "-", "-"),
        ("all INT8", f"{n} / {n}", _fmt(p["all_int8"], m), _time(lat["all_int8"]), "-", "-"),
        ("exact search" + mark("exact search"), _count_summary(p["exact"], n), _fmt(p["exact"]["metric"], m),
         _time(p["exact"]["latency_ms"]), *measured("exact search")),
        ("greedy (time saved per noise)" + mark("greedy"), _count_summary(p["greedy"], n), _fmt(p["greedy"]["metric"], m),
         _time(p["greedy"]["latency_ms"]), *measured("greedy")),
        (f"fallback, INC-style ({p['fallback']['evaluations']} evaluations)" + mark("fallback (INC-style)"),
         _count_summary(p["fallback"], n), _fmt(p["fallback"]["metric"], m), _time(p["fallback"]["latency_ms"]),
         *measured("fallback (INC-style)")),
    ] + ([(f"refined on integer programs (+{len(p['refined_layers'])} quantized)" + mark("refined"),
           _count_summary(p["refined"], n), _fmt(p["refined"]["metric"], m), _time(p["refined"]["latency_ms"]),
           *measured("refined"))] if p.get("refined") else [])


_HELD_HEADERS = ("sample", "output part", "FP32 under input rounding", "held to")
_NARROWED_HEADERS = ("read by", "width", "all int8 before", "all int8 after")


def _held_rows(p: dict) -> tuple[str, list[tuple[str, ...]]]:
    """The samples judged against FP32's own stability: a sentence, and (sample, part, FP32
    under input rounding, held to) rows; nothing when every sample is held to the budget."""
    held, m = p.get("held_samples") or [], p["metric"]
    if not held:
        return "", []
    floor = p["budget"] if m == "sqnr" else 1 - p["budget"]
    text = (f"{len(held)} sample part(s) FP32 itself cannot hold to the budget: their FP32 output moves further when "
            f"each image channel moves within {p['input_noise']:g} step(s) of its 8-bit grid, so their reading is not "
            "determined by the image. Each is held to twice the noise FP32 shows there instead (--input-noise 0 "
            "holds every sample to the budget); the part figures above are raw.")
    return text, [(str(h["sample"]), h["part"], _fmt(h["fp32_under_input_rounding"], m), _fmt(floor - h["slack"], m))
                  for h in held]


def _narrowed_rows(p: dict) -> tuple[str, list[tuple[str, ...]]]:
    """The activation ranges the search clipped: a sentence, and (readers, width, all-int8 SQNR
    before, after) rows; nothing when it kept every calibrated range."""
    narrowed = p.get("narrowed_ranges") or []
    if not narrowed:
        return "", []
    text = (f"{len(narrowed)} activation range(s) clipped: the layers reading each came within a few dB of the "
            "budget alone, and a narrower range (the calibrated one times the width) raised the simulated all-int8 "
            "SQNR (worst sample and part; each in turn, after those above) while neither half of the samples nor the "
            "median one lost; every plan the search compiles uses these ranges.")
    return text, [(", ".join(n["readers"]), f"{n['width']:g}", f"{n['all_int8_db'][0]:.1f} dB",
                   f"{n['all_int8_db'][1]:.1f} dB") for n in narrowed]


def _sections(p: dict) -> list[tuple[str, str, tuple[str, ...], list[tuple[str, ...]]]]:
    """The report's optional tables, as (HTML title, sentence, headers, rows), those with rows only."""
    sections = [("Samples judged against FP32's stability", *_held_rows(p), _HELD_HEADERS),
                ("Activation ranges clipped", *_narrowed_rows(p), _NARROWED_HEADERS)]
    return [(title, text, headers, rows) for title, text, rows, headers in sections if rows]


def _md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def precision_markdown(p: dict) -> str:
    """The precision section of report.md: the same numbers as report.html."""
    lines = ["", "## Precision plan (--precision auto)", "",
             f"Budget: {_budget_text(p)}; measured on {p['samples']} samples ({p['evaluations']} compiled-simulation "
             f"runs). Candidates: {', '.join(p['candidates'])}. Latency is the sum of the layers' kernel times "
             f"({p['latency_source']}).", "",
             "| plan | int8 layers | simulated metric | kernel latency (sum) | compiled: metric | compiled: latency |",
             "|---|---|---|---|---|---|"]
    lines += [_md_row(row) for row in _summary_rows(p)]
    parts = p.get("parts", {})
    if parts.get("plan"):
        lines += ["", "Every output and output part (an output's final Concat inputs, --output-slice) judged apart; "
                  "the budget holds for the worst:", "", "| output part | chosen plan (compiled) | all int8 (simulated) |",
                  "|---|---|---|"]
        lines += [f"| {label} | {_fmt(value, p['metric'])} | {_fmt(parts['all_int8'].get(label), p['metric'])} |"
                  for label, value in parts["plan"].items()]
    for _, text, headers, rows in _sections(p):
        lines += ["", text, "", _md_row(headers), "|" + "---|" * len(headers), *map(_md_row, rows)]
    lines += ["", "int16: int8 weights on 16-bit activations.", "", _md_row(_LAYER_HEADERS),
              "|" + "---|" * len(_LAYER_HEADERS)]
    lines += [_md_row(row) for row in _layer_rows(p)]
    return "\n".join(lines) + "\n"


_LAYER_HEADERS = ("layer", "kind", "only this layer int8", "all but this layer int8", "only this layer int16",
                  "only this layer fp16", "fp32 ms", "int8 ms", "int16 ms", "fp16 ms", "chosen")


def _layer_rows(p: dict) -> list[tuple[str, ...]]:
    """The per-layer table's rows (:data:`_LAYER_HEADERS`); reports written before int16 lack its figures."""
    m = p["metric"]
    return [(layer["name"], layer["kind"], _fmt(layer["only_int8"], m), _fmt(layer["only_float"], m),
             _fmt(layer.get("only_int16"), m), _fmt(layer["only_fp16"], m), f"{layer['fp32_ms']:.4f}",
             f"{layer['int8_ms']:.4f}", _ms(layer.get("int16_ms")), _ms(layer["fp16_ms"]), layer["chosen"])
            for layer in p["layers"]]


def _charts(out: Path, p: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = p["layers"]
    names = [layer["name"] for layer in layers]
    chosen = {layer["name"]: layer["chosen"] for layer in layers}
    colors = [_COLORS[chosen[n]] for n in names]
    height = max(3.0, 0.28 * len(layers) + 1.5)
    return [_sensitivity_chart(plt, out, p, names, colors, height), _latency_chart(plt, out, p, names, colors, height),
            _tradeoff_chart(plt, out, p)]


def _save(plt, fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _sensitivity_chart(plt, out: Path, p: dict, names: list[str], colors: list[str], height: float) -> str:
    """How much each layer alone costs when quantized (and, for other metrics, the output SQNR the
    search budgets with, which separates layers a discrete metric cannot)."""
    layers = p["layers"]
    y = list(range(len(layers)))
    panels = 1 if p["metric"] == "sqnr" else 2
    fig, axes = plt.subplots(1, panels, figsize=(9 if panels == 1 else 12, height), sharey=True, squeeze=False)
    sqnr_ax = axes[0][panels - 1]
    sqnr_ax.barh(y, [min(layer.get("sqnr_int8", layer["only_int8"]), 120.0) for layer in layers], color=colors)
    sqnr_ax.set_xlabel("output SQNR vs FP32, only this layer int8 (dB; lower = more sensitive)")
    if p["metric"] == "sqnr":
        sqnr_ax.axvline(p["budget"], color="black", linestyle="--", linewidth=1, label=f"budget {p['budget']:g} dB")
        sqnr_ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    else:
        ax = axes[0][0]
        scale = 100 if p["metric"] == "top1" else 1
        ax.barh(y, [scale * max(p["fp32"] - layer["only_int8"], 0.0) for layer in layers], color=colors)
        ax.set_xlabel(f"{p['metric']} drop, only this layer int8" + (" (points)" if scale == 100 else ""))
        ax.axvline(scale * p["budget"], color="black", linestyle="--", linewidth=1, label="budget")
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    axes[0][0].set_yticks(y, names, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("Per-layer sensitivity (colour: the plan's choice; blue int8, green fp16, red fp32)", fontsize=10)
    return _save(plt, fig, out, "sensitivity.png")


def _latency_chart(plt, out: Path, p: dict, names: list[str], colors: list[str], height: float) -> str:
    """Latency per layer: FP32 kernel, INT8 kernel, and what the plan uses."""
    layers = p["layers"]
    y = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(9, height))
    ax.barh([v - 0.2 for v in y], [layer["fp32_ms"] for layer in layers], height=0.4, color="#999999", label="FP32 kernel")
    ax.barh([v + 0.2 for v in y], [layer[f"{layer['chosen']}_ms"] or 0.0 for layer in layers],
            height=0.4, color=colors, label="plan (blue int8, green fp16, red fp32)")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"kernel time (ms; {p['latency_source']})")
    fig.suptitle("Latency per layer before (FP32) and after (plan)", fontsize=10)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False, fontsize=8)
    return _save(plt, fig, out, "latency.png")


def _tradeoff_points(p: dict, rows: list[tuple]) -> dict[tuple[float, float], list[str]]:
    """``{(ms, metric): labels}``: plans landing within 2% of the axes of each other share a point."""
    finite = [v for _, v, _ in rows if v is not None and math.isfinite(v)]
    top = max(finite) if finite else 0.0
    shown = [(label, value if value is not None and math.isfinite(value) else top + 3.0, ms)  # FP32's SQNR: inf
             for label, value, ms in rows]
    xspan = max(max(r[2] for r in shown) - min(r[2] for r in shown), 1e-12)
    yspan = max(max(r[1] for r in shown) - min(r[1] for r in shown), 1e-12)
    points = {}
    for label, value, ms in shown:
        key = next((k for k in points if abs(k[0] - ms) < 0.02 * xspan and abs(k[1] - value) < 0.02 * yspan), (ms, value))
        inf = label == "FP32" and not math.isfinite(p["fp32"])
        points.setdefault(key, []).append(label + (" (inf)" if inf else ""))
    return points


def _tradeoff_chart(plt, out: Path, p: dict) -> str:
    """Accuracy vs latency of the candidate plans; plans landing on the same point share a label."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    rows = [("FP32", p["fp32"], p["latency_ms"]["fp32"]), ("all INT8", p["all_int8"], p["latency_ms"]["all_int8"]),
            ("exact search", p["exact"]["metric"], p["exact"]["latency_ms"]),
            ("greedy", p["greedy"]["metric"], p["greedy"]["latency_ms"]),
            ("fallback (INC)", p["fallback"]["metric"], p["fallback"]["latency_ms"])]
    points = _tradeoff_points(p, rows)
    scale, unit = (1e3, "us") if max(ms for _, _, ms in rows) < 0.1 else (1.0, "ms")
    for (ms, value), labels in points.items():
        colour = "#2b7bba" if "exact search" in labels else "#777777"
        ax.scatter(ms * scale, value, s=60, color=colour, zorder=3)
        ax.annotate(" = ".join(labels), (ms * scale, value), textcoords="offset points", xytext=(8, -3), fontsize=8)
    xs = [ms * scale for ms, _ in points]
    span = max(max(xs) - min(xs), 0.05 * max(xs), 1e-9)
    ax.set_xlim(min(xs) - 0.15 * span, max(xs) + 0.6 * span)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(f"estimated kernel latency ({unit})")
    ax.set_ylabel(p["metric"] + (" (dB)" if p["metric"] == "sqnr" else ""))
    ax.set_title("Accuracy vs latency of the candidate plans")
    ax.grid(alpha=0.3)
    return _save(plt, fig, out, "tradeoff.png")


def write_html(out: Path, manifest: dict) -> list[str]:
    """Write ``report.html`` and its PNG charts into ``out``; returns the files written."""
    out = Path(out)
    p = manifest["precision"]
    charts = _charts(out, p)
    esc = html.escape

    def cells(rows):
        return "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)

    summary = cells(_summary_rows(p))
    m = p["metric"]
    layer_rows = "".join(f"<tr class='{row[-1]}'>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
                         for row in _layer_rows(p))
    sections = "".join(f"<h2>{title}</h2><p>{esc(text)}</p><table><tr>{''.join(f'<th>{h}</th>' for h in headers)}</tr>"
                       f"{cells(rows)}</table>" for title, text, headers, rows in _sections(p))
    model = esc(str(manifest["model"].get("file", "model")))
    target = manifest["target"]
    images = "".join(f"<figure><img src='{c}' alt='{c}'></figure>" for c in charts)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tvmq precision report: {model}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1000px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f0f0f0; }}
tr.fp32 td:last-child {{ color: {_COLORS['fp32']}; font-weight: bold; }}
tr.int8 td:last-child {{ color: {_COLORS['int8']}; }}
tr.int16 td:last-child {{ color: {_COLORS['int16']}; }}
tr.fp16 td:last-child {{ color: {_COLORS['fp16']}; font-weight: bold; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head><body>
<h1>tvmq precision report: {model}</h1>
<p>Target <code>{esc(target['preset'])}</code> ({esc(target['triple'])}). Budget: <b>{esc(_budget_text(p))}</b>,
measured on {p['samples']} samples with {p['evaluations']} runs of a compiled simulation. Candidates:
{esc(', '.join(p['candidates']))}. Latencies: {esc(p['latency_source'])}.</p>
<h2>Plans</h2>
<table><tr><th>plan</th><th>int8 layers</th><th>simulated {esc(m)}</th><th>kernel latency (sum)</th>
<th>compiled: {esc(m)}</th><th>compiled: latency</th></tr>{summary}</table>
<p>Simulated: the switchable simulation the search runs; compiled: the integer program each plan
compiles to, timed as a whole model on this machine (which also counts the conversions between int8
and float regions).</p>
{sections}
{images}
<h2>Layers</h2>
<p>int16: int8 weights on 16-bit activations.</p>
<table><tr>{''.join(f'<th>{h}</th>' for h in _LAYER_HEADERS)}</tr>{layer_rows}</table>
</body></html>
"""
    (out / "report.html").write_text(page)
    return ["report.html", *charts]


def _fmt_qp(d: dict | None) -> str:
    if not d:
        return "float"
    if isinstance(d.get("scale"), list):
        return f"{d['dtype']} per-channel"
    return f"{d['dtype']} s={d['scale']:.4g} zp={d['zero_point']}"


def bundle_markdown(m: dict) -> str:
    """``report.md``: the build's target, quantization, layers and integer kernels (from the manifest)."""
    lines = [
        f"# tvmq build report: {m['model'].get('file', 'model')}",
        "",
        f"- target: `{m['target']['preset']}` ({m['target']['triple']}, cpu {m['target']['cpu']})",
        f"- tvmq {m['versions']['tvmq']}, apache-tvm {m['versions']['apache-tvm']}",
    ]
    q = m["quantization"]
    if q:
        lines.append(
            f"- quantization: {q['int8_layers']} int8 layers, {q['float_layers']} float ({q.get('fp16_layers', 0)} of them fp16); "
            f"calibration `{q['method']}`, "
            f"activations {q['activation_dtype']}, requantize `{q['requantize']}`"
        )
        if q.get("kept_float_for_speed"):
            from tvmq.targets.intrinsics import MICRO_KERNELS

            kernel = m["target"]["int8_kernel"]
            lines.append(f"- kept float where int8 is no faster on `{kernel}` ({MICRO_KERNELS[kernel].float_rules()}; "
                         f"`--int8-everywhere` quantizes them): {', '.join(q['kept_float_for_speed'])}")
    wb = m["weight_bytes"]
    total_f = sum(wb["float_model"].values())
    total_c = sum(wb["compiled"].values())
    lines.append(f"- constant bytes: {total_f} in the float model, {total_c} compiled ({wb['compiled']})")
    for w in m["warnings"]:
        lines.append(f"- warning: {w}")
    lines += ["", "## Layers", "", "| layer | kind | precision | input | output | weight scale range |", "|---|---|---|---|---|---|"]
    for name, e in m["layers"].items():
        inputs = ", ".join(_fmt_qp(i) for i in e.get("inputs", [])) or "float"
        w = e.get("weight")
        wr = f"{w['scale_min']:.3g} .. {w['scale_max']:.3g}" if w else ""
        lines.append(f"| {name} | {e['kind']} | {e['precision']} | {inputs} | {_fmt_qp(e.get('output'))} | {wr} |")
    lines += ["", "## Multiply-accumulate kernels (lowered TIR)", "",
              "| kernel | operands | accumulator | micro-kernel intrinsic |", "|---|---|---|---|"]
    for k in m["kernels"]:
        lines.append(f"| {k['func']} | {' x '.join(k['operands'])} | {k['accumulator']} | {k.get('intrinsic') or ''} |")
    return "\n".join(lines) + "\n"
