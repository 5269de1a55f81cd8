"""Charts as inline SVG, drawn on the server: no chart library to vendor, and a page that shows its
charts with JavaScript off. Two kinds: latency against batch size (a line per candidate), and
accuracy against speed (a point per candidate, the eager baseline marked)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup, escape

from service.dashboard.formatting import ms, num, speedup

# Colour-blind-safe (Okabe-Ito, then Tableau), dark enough for white backgrounds.
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#8c564b", "#7f7f7f", "#bcbd22", "#17becf")
EAGER_COLOR = "#334155"
WIDTH, HEIGHT = 560, 300
PAD = {"left": 64, "right": 20, "top": 16, "bottom": 48}


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


@dataclass
class Series:
    """One line: a name and its benchmark points by batch size."""

    name: str
    color: str
    points: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    dashed: bool = False


@dataclass
class Point:
    """One candidate on the accuracy/speed plane."""

    name: str
    color: str
    speedup: float
    error: float
    passed: bool
    selected: bool = False


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering lo..hi (1, 2, 2.5 or 5 times a power of ten apart)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _frame(kind: str, label: str) -> list[str]:
    return [
        f'<svg class="chart chart-{kind}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(label)}</title>",
    ]


def _axes(parts: list[str], x_label: str, y_label: str) -> None:
    x0, y0 = PAD["left"], HEIGHT - PAD["bottom"]
    parts.append(f'<line class="axis" x1="{x0}" y1="{PAD["top"]}" x2="{x0}" y2="{y0}"/>')
    parts.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{WIDTH - PAD["right"]}" y2="{y0}"/>')
    parts.append(
        f'<text class="axis-label" x="{(x0 + WIDTH - PAD["right"]) / 2}" y="{HEIGHT - 8}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    parts.append(
        f'<text class="axis-label" transform="translate(14 {(PAD["top"] + y0) / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )


def _empty(kind: str, label: str, message: str) -> Markup:
    parts = _frame(kind, label)
    parts.append(f'<text class="empty" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">{escape(message)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def latency_chart(series: list[Series], batch_sizes: list[int]) -> Markup:
    """p50 latency (lines) against batch size, one line per candidate; the eager line dashed.
    Each marker's tooltip has p50, p90 and p99."""
    label = "p50 latency against batch size"
    if not series or not batch_sizes:
        return _empty("latency", label, "no benchmark yet")
    top = max(p["p50_ms"] for s in series for _, p in s.points)
    ticks = nice_ticks(0.0, top)
    y_max = ticks[-1]
    x0, x1 = PAD["left"], WIDTH - PAD["right"]
    y0, y1 = HEIGHT - PAD["bottom"], PAD["top"]
    slot = (x1 - x0) / len(batch_sizes)
    xs = {b: x0 + slot * (i + 0.5) for i, b in enumerate(batch_sizes)}

    def y(v: float) -> float:
        return y0 - (v / y_max) * (y0 - y1)

    parts = _frame("latency", label)
    for t in ticks:
        parts.append(f'<line class="grid" x1="{x0}" y1="{y(t):.1f}" x2="{x1}" y2="{y(t):.1f}"/>')
        parts.append(f'<text class="tick" x="{x0 - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{num(t)}</text>')
    for b, x in xs.items():
        parts.append(f'<text class="tick" x="{x:.1f}" y="{y0 + 18}" text-anchor="middle">{b}</text>')
    _axes(parts, "batch size", "p50 latency (ms)")
    for s in series:
        coords = [(xs[b], y(p["p50_ms"]), b, p) for b, p in s.points if b in xs]
        path = " ".join(f"{'M' if i == 0 else 'L'}{cx:.1f},{cy:.1f}" for i, (cx, cy, _, _) in enumerate(coords))
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(f'<g class="series" data-name="{escape(s.name)}">')
        parts.append(f'<path d="{path}" fill="none" stroke="{s.color}" stroke-width="2"{dash}/>')
        for cx, cy, b, p in coords:
            tip = (
                f"{s.name}, batch {b}: p50 {ms(p['p50_ms'])} ms, p90 {ms(p.get('p90_ms'))} ms, "
                f"p99 {ms(p.get('p99_ms'))} ms"
            )
            parts.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{s.color}"><title>{escape(tip)}</title></circle>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))


def tradeoff_chart(points: list[Point], has_eager: bool = True) -> Markup:
    """Accuracy against speed: x the speed-up against eager PyTorch, y the worst relative error on a
    log scale (lower is more accurate). Eager sits at 1× with no error: a dashed line and a diamond
    on the floor mark it. Filled circles passed validation, crosses failed; a ring marks the winner."""
    label = "accuracy against speed"
    if not points:
        return _empty("tradeoff", label, "no validated and benchmarked candidate yet")
    x_ticks = nice_ticks(0.0, max(max(p.speedup for p in points), 1.0) * 1.1)
    x_max = x_ticks[-1]
    nonzero = [p.error for p in points if p.error > 0]
    lo_exp = math.floor(math.log10(min(nonzero))) if nonzero else -9
    hi_exp = math.ceil(math.log10(max(nonzero))) if nonzero else -6
    lo_exp -= 1  # a decade of room below the best, where exact (zero-error) results and eager sit
    hi_exp = max(hi_exp, lo_exp + 2)
    x0, x1 = PAD["left"], WIDTH - PAD["right"]
    y0, y1 = HEIGHT - PAD["bottom"], PAD["top"]

    def x(v: float) -> float:
        return x0 + (v / x_max) * (x1 - x0)

    def y(err: float) -> float:
        e = math.log10(err) if err > 0 else lo_exp
        return y0 - (max(e, lo_exp) - lo_exp) / (hi_exp - lo_exp) * (y0 - y1)

    parts = _frame("tradeoff", label)
    step = max(1, (hi_exp - lo_exp) // 6)
    for e in range(lo_exp, hi_exp + 1, step):
        yy = y(10.0**e)
        parts.append(f'<line class="grid" x1="{x0}" y1="{yy:.1f}" x2="{x1}" y2="{yy:.1f}"/>')
        text = "0" if e == lo_exp else f"1e{e}"
        parts.append(f'<text class="tick" x="{x0 - 6}" y="{yy + 4:.1f}" text-anchor="end">{text}</text>')
    for t in x_ticks:
        parts.append(f'<text class="tick" x="{x(t):.1f}" y="{y0 + 18}" text-anchor="middle">{num(t, 2)}×</text>')
    _axes(parts, "speed-up against eager PyTorch (batch 1, p50) →", "worst relative error (log)")
    if has_eager:
        ex = x(1.0)
        parts.append(
            f'<g class="eager"><line x1="{ex:.1f}" y1="{y1}" x2="{ex:.1f}" y2="{y0}" stroke="{EAGER_COLOR}" '
            'stroke-dasharray="6 4" stroke-width="1.5"/>'
        )
        parts.append(
            f'<path d="M{ex:.1f},{y0 - 8} l7,7 l-7,7 l-7,-7 z" fill="{EAGER_COLOR}" '
            f'transform="translate(0 -7)"><title>eager PyTorch: 1× speed, the reference (no error)</title>'
            "</path>"
        )
        # labelled on the floor beside its diamond, where no candidate with an error can be
        parts.append(f'<text class="point-label eager-label" x="{ex + 11:.1f}" y="{y0 - 4}">eager PyTorch</text></g>')
    for p in sorted(points, key=lambda p: p.selected):  # the winner drawn last, on top
        px, py = x(p.speedup), y(p.error)
        tip = f"{p.name}: {speedup(p.speedup)} eager, relative error {num(p.error)}, {'pass' if p.passed else 'FAIL'}"
        parts.append(
            f'<g class="point {"pass" if p.passed else "fail"}" data-name="{escape(p.name)}">'
            f"<title>{escape(tip)}</title>"
        )
        if p.selected:
            parts.append(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="11" fill="none" stroke="{p.color}" stroke-width="2"/>'
            )
        if p.passed:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="6" fill="{p.color}"/>')
        else:
            parts.append(
                f'<path d="M{px - 6:.1f},{py - 6:.1f} l12,12 m0,-12 l-12,12" stroke="{p.color}" stroke-width="3"/>'
            )
        anchor, dx = ("end", -10) if px > x1 - 140 else ("start", 10)
        parts.append(
            f'<text class="point-label" x="{px + dx:.1f}" y="{py - 8:.1f}" text-anchor="{anchor}">'
            f"{escape(p.name)}</text></g>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))
