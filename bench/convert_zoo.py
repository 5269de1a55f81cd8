"""Convert the zoo's CNN (ResNet-18-sized, 224x224) and transformer encoder with every CPU target
and precision, and print latency ratios against eager PyTorch measured in the same run, with the
accuracy figures beside them.

    .venv/bin/python bench/convert_zoo.py [--threads 2] [--seconds 2] [--models cnn,transformer]
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers import engine  # noqa: E402 - after the sys.path set-up above

MODELS = {
    "cnn": ("cnn.py", "build_model"),
    "transformer": ("transformer.py", "build_model"),
}


def signature_of(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    consts = {
        n.targets[0].id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.targets[0], ast.Name)
    }
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SIGNATURE")
    return eval(ast.unparse(node.value), {"__builtins__": {}}, consts)  # noqa: S307 - literals only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per benchmark point")
    ap.add_argument("--models", default="cnn,transformer")
    ap.add_argument("--precisions", default="fp32,fp16,bf16,int8")
    ap.add_argument("--keep", type=Path, help="keep the outputs here")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    for name in args.models.split(","):
        filename, entry = MODELS[name]
        src = ROOT / "tests" / "zoo" / filename
        out = base / name
        ctx = engine.convert(
            src,
            out,
            entry=f"{filename}:{entry}",
            signature=signature_of(src),
            options={
                "targets": ["onnxruntime", "torchscript"],
                "precisions": args.precisions.split(","),
                "threads": args.threads,
                "bench_seconds": args.seconds,
            },
        )
        eager = ctx.eager_benchmark
        print(
            f"\n== {name}: {args.threads} thread(s); eager PyTorch p50 at batch "
            + ", ".join(f"{p.batch}: {p.p50_ms:.2f} ms" for p in eager)
        )
        batches = [p.batch for p in eager]
        head = f"{'candidate':<26}{'status':<8}" + "".join(
            f"{'b' + str(b) + ' ms':>10}{'vs eager':>9}" for b in batches
        )
        print(head + f"{'max abs':>10}{'cosine':>10}{'top-1':>7}")
        for c in ctx.candidates:
            v = c.validation
            outs = list(v.outputs.values()) if v else []
            status = c.status if c.status != "built" else ("pass" if c.passed else "FAIL")
            row = f"{c.id:<26}{status:<8}"
            for i in range(len(batches)):
                p = c.benchmark[i] if i < len(c.benchmark) else None
                row += f"{p.p50_ms:>10.2f}{eager[i].p50_ms / p.p50_ms:>8.2f}x" if p else f"{'':>10}{'':>9}"
            if outs:
                top1 = [o.top1 for o in outs if o.top1 is not None]
                row += f"{max(o.max_abs for o in outs):>10.3g}{min(o.cosine for o in outs):>10.6f}"
                row += f"{min(top1):>7.3f}" if top1 else f"{'':>7}"
            print(
                row
                + ("" if c.status == "built" else f"  ({c.reason[:70]})")
                + ("" if not (c.status == "built" and not c.passed) else f"  ({v.reason[:70]})")
            )
        print(
            f"selected: {ctx.selection.candidate if ctx.selection else None}"
            f" ({ctx.selection.reason if ctx.selection else ''})"
        )
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
