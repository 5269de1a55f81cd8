"""How the dashboard writes numbers, times, sizes, signatures and tolerances. Jinja filters, and
plain functions the view code and the tests use, so a number on a page is written one way only."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

DASH = "—"


def num(value: float | None, digits: int = 3) -> str:
    """Significant digits, switching to exponent form for very small numbers (errors often are)."""
    if value is None:
        return DASH
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        return "∞" if v > 0 else ("-∞" if v < 0 else "NaN")
    if v == 0:
        return "0"
    if abs(v) >= 10**digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def ms(value: float | None) -> str:
    """A latency in milliseconds."""
    return num(value, 3)


def cosine(value: float | None) -> str:
    # Six decimals: the difference between fp32 (1.000000) and int8 (0.998425) must show.
    return DASH if value is None else f"{float(value):.6f}"


def percent(value: float | None) -> str:
    return DASH if value is None else f"{float(value) * 100:.1f}%"


def speedup(value: float | None) -> str:
    return DASH if value is None else f"{float(value):.2f}×"


def size(n: int | None) -> str:
    """Bytes in binary units."""
    if n is None:
        return DASH
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def duration(seconds: float | None) -> str:
    """A step or job duration: '<1 ms', '312 ms', '4.97 s', '2 min 5 s', '1 h 3 min'."""
    if seconds is None:
        return DASH
    s = float(seconds)
    if s < 0.001:
        return "<1 ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; Kiln writes every time in UTC."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def iso(dt: datetime | None) -> str:
    """ISO 8601 in UTC with a Z, for <time datetime=...> (the browser shows it in local time)."""
    d = utc(dt)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if d else ""


def when(dt: datetime | None) -> str:
    """The text shown before the browser rewrites it in local time."""
    d = utc(dt)
    return d.strftime("%Y-%m-%d %H:%M:%S UTC") if d else DASH


def elapsed(start: datetime | None, end: datetime | None) -> float | None:
    if start is None:
        return None
    stop = utc(end) or datetime.now(UTC)
    return max((stop - (utc(start) or stop)).total_seconds(), 0.0)


def tensor(spec: dict[str, Any]) -> str:
    """One signature entry as people write it: 'image: float32[batch, 3, 32, 32]'."""
    text = spec["name"]
    if spec.get("dtype"):
        shape = spec.get("shape")
        text += f": {spec['dtype']}" + (f"[{', '.join(str(d) for d in shape)}]" if shape is not None else "")
    return text


def dims(signature: dict[str, Any]) -> list[str]:
    """Dynamic dimensions with their ranges: 'batch 1…4 (opt 2)'."""
    return [f"{name} {r['min']}…{r['max']} (opt {r['opt']})" for name, r in (signature.get("dims") or {}).items()]


def tolerance(tol: dict[str, Any] | None) -> str:
    """A tolerance as the checks it stands for: '|Δ| ≤ 0.0001 + 0.001·|ref|, cos ≥ 0.99999'."""
    return ", ".join(tolerance_checks(tol)) if tol else DASH


def tolerance_checks(tol: dict[str, Any] | None) -> list[str]:
    """Each check of a tolerance on its own (a page keeps each one unbroken)."""
    parts: list[str] = []
    if not tol:
        return parts
    if tol.get("atol") is not None or tol.get("rtol") is not None:
        parts.append(f"|Δ| ≤ {tol.get('atol') or 0:g} + {tol.get('rtol') or 0:g}·|ref|")
    if tol.get("min_cosine") is not None:
        parts.append(f"cos ≥ {tol['min_cosine']:g}")
    if tol.get("min_top1") is not None:
        parts.append(f"top-1 ≥ {tol['min_top1'] * 100:g}%")
    return parts or ["no checks"]


def step_outputs(outputs: dict[str, Any]) -> list[tuple[str, str]]:
    """A step's outputs as short 'key: value' pairs for its timeline row (the report has them all)."""
    pairs = []
    for key, value in (outputs or {}).items():
        if key == "report":  # a path on the worker, of no use in a browser
            continue
        if isinstance(value, dict):
            text = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            text = ", ".join(str(v) for v in value) or DASH
        elif isinstance(value, float):
            text = num(value)
        else:
            text = DASH if value is None else str(value)
        pairs.append((key, text))
    return pairs


def log_tail(log: str | None, lines: int = 40) -> str:
    """The end of a step's log: where a failure explains itself."""
    return "\n".join((log or "").rstrip("\n").splitlines()[-lines:])


def short_id(value: str | None) -> str:
    return (value or "")[:8]


FILTERS = {
    "num": num,
    "ms": ms,
    "cosine": cosine,
    "percent": percent,
    "speedup": speedup,
    "size": size,
    "duration": duration,
    "iso": iso,
    "when": when,
    "tensor": tensor,
    "tolerance": tolerance,
    "tolerance_checks": tolerance_checks,
    "short_id": short_id,
    "step_outputs": step_outputs,
    "log_tail": log_tail,
}
