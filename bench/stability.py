"""Do Kiln's speed-ups survive a busy machine?

Converts the zoo's CNN and transformer twice through the real pipeline (sandbox, exporters,
ONNX Runtime, interleaved timing): once as the machine is, once while a CPU hog of two busy
processes runs beside it. Prints both sets of speed-ups with their intervals and checks the two
aims: every figure of the loaded run lies within its own interval of the quiet one or is flagged
noisy, and no speed-up of the loaded run exceeds the quiet one by more than 25%.

    .venv/bin/python bench/stability.py [--models cnn,transformer] [--bench-seconds 1.0]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ZOO, zoo_signature  # noqa: E402 - after the sys.path entry above
from workers import engine  # noqa: E402 - after the sys.path entry above

MAX_INFLATION = 1.25


def _spin() -> None:  # pragma: no cover - a hog process
    while True:
        pass


def convert(model: str, out: Path, bench_seconds: float) -> dict[str, tuple[float, float, float, bool]]:
    shutil.copyfile(ZOO / f"{model}.py", out.parent / f"{model}.py")
    ctx = engine.convert(
        out.parent / f"{model}.py",
        out,
        signature=zoo_signature(model),
        options={"targets": ["onnxruntime", "torchscript"], "precisions": ["fp32"], "bench_seconds": bench_seconds},
    )
    cond = ctx.benchmark_conditions
    print(
        f"  {model}: {cond.get('rounds')} rounds, load {cond['load_before']['load_1m']:.2f} -> "
        f"{cond['load_after']['load_1m']:.2f}; selected {ctx.selection.candidate}: {ctx.selection.reason}"
    )
    return {c.id: (c.speedup, c.speedup_low, c.speedup_high, c.noisy) for c in ctx.candidates if c.speedup}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,transformer")
    ap.add_argument("--bench-seconds", type=float, default=1.0)
    args = ap.parse_args()
    models = args.models.split(",")
    results: dict[str, dict[str, dict[str, tuple[float, float, float, bool]]]] = {"quiet": {}, "loaded": {}}
    with tempfile.TemporaryDirectory(prefix="kiln-stability-") as tmp:
        for phase in ("quiet", "loaded"):
            hogs = []
            if phase == "loaded":
                hogs = [mp.Process(target=_spin, daemon=True) for _ in range(2)]
                for h in hogs:
                    h.start()
                time.sleep(2)
            print(f"{phase} run ({os.cpu_count()} CPUs, {len(hogs)} busy processes beside it)")
            try:
                for model in models:
                    work = Path(tmp) / phase / model
                    work.mkdir(parents=True)
                    results[phase][model] = convert(model, work / "out", args.bench_seconds)
            finally:
                for h in hogs:
                    h.kill()
    print()
    print(
        f"| model | candidate | quiet speed-up | loaded speed-up | loaded within its interval of quiet, or noisy "
        f"| loaded <= {MAX_INFLATION}x quiet |"
    )
    print("|---|---|---|---|---|---|")
    ok = True
    for model in models:
        for cid, (q, ql, qh, qn) in results["quiet"][model].items():
            if cid not in results["loaded"][model]:
                continue
            ld, ll, lh, ln = results["loaded"][model][cid]
            within = ln or (ll <= q <= lh)
            bounded = ld <= MAX_INFLATION * q
            ok &= within and bounded
            print(
                f"| {model} | {cid} | {q:.2f}x ({ql:.2f}-{qh:.2f}){' noisy' if qn else ''} | "
                f"{ld:.2f}x ({ll:.2f}-{lh:.2f}){' noisy' if ln else ''} | {'yes' if within else 'NO'} | "
                f"{'yes' if bounded else 'NO'} ({ld / q:.2f}) |"
            )
    print()
    print("aims met" if ok else "AIMS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
