"""Checks of an uploaded Python bundle made by reading its source, never by running it.

Uploaded code runs only in the sandbox (service/boundary.py). What can be told from the text alone is
told at upload, in one sentence: a syntax error (file and line), an entry point the file does not
define, and a signature that cannot fit `forward` (how many inputs, and their names where `forward`
names them). `ast.parse` compiles to a tree and executes nothing. Where the tree cannot tell (an
entry point imported from elsewhere, a model built by a library, `forward(*args)`), the check
accepts, and the sandboxed load decides.
"""

from __future__ import annotations

import ast
from pathlib import Path

from service.errors import InvalidBundle, InvalidEntryPoint, InvalidSignature
from service.signature import Signature

MAX_FILES = 2000  # an archive holds at most 10,000 members; parsing is linear in the source


def parse_all(root: Path) -> dict[Path, ast.Module]:
    """Every .py file of the bundle parsed; the first syntax error is refused with its file and line."""
    trees: dict[Path, ast.Module] = {}
    for path in sorted(root.rglob("*.py"))[:MAX_FILES]:
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(root)
        try:
            source = path.read_bytes()
            trees[rel] = ast.parse(source, filename=str(rel))
        except SyntaxError as exc:
            where = f"{rel}:{exc.lineno}" if exc.lineno else str(rel)
            text = f" ({exc.text.strip()[:120]!r})" if exc.text and exc.text.strip() else ""
            raise InvalidBundle(f"{where}: {type(exc).__name__}: {exc.msg}{text}") from None
        except ValueError as exc:  # null bytes
            raise InvalidBundle(f"{rel} is not Python source: {exc}") from None
    return trees


def _top_level_names(tree: ast.Module) -> tuple[dict[str, ast.AST], bool]:
    """Names a module defines at top level (functions, classes, assignments, imports), and whether
    it has a `from x import *` or a dynamic definition that hides what it defines."""
    names: dict[str, ast.AST] = {}
    opaque = False
    for node in tree.body:
        for sub in _flatten(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names[sub.name] = sub
            elif isinstance(sub, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            names[n.id] = sub
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                for alias in sub.names:
                    if alias.name == "*":
                        opaque = True
                    else:
                        names[(alias.asname or alias.name).split(".")[0]] = sub
            elif isinstance(sub, ast.Expr) and isinstance(sub.value, ast.Call):
                f = sub.value.func  # globals().update(...), setattr(sys.modules[...], ...)
                if (
                    isinstance(f, ast.Attribute)
                    and f.attr == "update"
                    or isinstance(f, ast.Name)
                    and f.id in ("setattr", "exec")
                ):
                    opaque = True
    return names, opaque


def _flatten(node: ast.AST) -> list[ast.AST]:
    """A top-level statement and those nested in its if/try/with blocks (still top level)."""
    if isinstance(node, (ast.If, ast.Try, ast.With)) or type(node).__name__ == "TryStar":
        out: list[ast.AST] = [node]
        for field in ("body", "orelse", "finalbody"):
            for child in getattr(node, field, []):
                out += _flatten(child)
        for handler in getattr(node, "handlers", []):
            for child in handler.body:
                out += _flatten(child)
        return out
    return [node]


def _model_class(fn: ast.AST, classes: dict[str, ast.ClassDef]) -> ast.ClassDef | None:
    """The class of this module an entry point returns, when its return statements name exactly one."""
    if isinstance(fn, ast.ClassDef):
        return fn
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    found: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Return) and node.value is not None:
            for sub in ast.walk(node.value):
                if (
                    isinstance(sub, ast.Call)
                    and isinstance(sub.func, ast.Name)
                    and sub.func.id in classes
                    and _forward(classes[sub.func.id]) is not None
                ):
                    found.add(sub.func.id)
    return classes[found.pop()] if len(found) == 1 else None


def _forward(cls: ast.ClassDef) -> ast.FunctionDef | None:
    return next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward"), None)


def check_forward(forward: ast.FunctionDef, cls_name: str, rel: Path, signature: Signature) -> None:
    """The signature's inputs are passed to forward by position: their count must fit, and where a
    position has a name in forward, the input's name must be that name."""
    args = forward.args
    positional = [a.arg for a in (*args.posonlyargs, *args.args)][1:]  # without self
    if args.vararg is not None:
        return  # forward(*args): only running it tells
    required = len(positional) - len(args.defaults)
    given = [t.name for t in signature.inputs]
    shown = f"{cls_name}.forward({', '.join(positional)}) in {rel}:{forward.lineno}"
    if not required <= len(given) <= len(positional):
        want = f"{required}" if required == len(positional) else f"{required} to {len(positional)}"
        raise InvalidSignature(f"the signature has {len(given)} input(s) ({', '.join(given)}) but {shown} takes {want}")
    wrong = [(i, g, p) for i, (g, p) in enumerate(zip(given, positional), 1) if g != p]
    if wrong:
        raise InvalidSignature(
            f"the signature's inputs ({', '.join(given)}) do not match {shown}: "
            + ", ".join(f"input {i} is {g!r} where forward has {p!r}" for i, g, p in wrong)
            + " (inputs are passed in order; name them as forward does)"
        )


def check_python_bundle(root: Path, entry: str, signature: Signature | None) -> None:
    """Syntax of every file, the entry point's definition, and the signature against forward."""
    trees = parse_all(root)
    target, sep, attr = entry.partition(":")
    if not sep or not target or not attr:
        raise InvalidEntryPoint(f"entry point {entry!r} must look like 'model.py:build_model'")
    if not target.endswith(".py") or "." in attr:
        return  # a module path or a nested attribute: the sandboxed import resolves it
    rel = Path(target)
    tree = trees.get(rel)
    if tree is None:
        return
    names, opaque = _top_level_names(tree)
    fn = names.get(attr)
    if fn is None:
        if opaque:
            return
        defined = sorted(
            n
            for n, node in names.items()
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not n.startswith("_")
        )
        raise InvalidEntryPoint(
            f"entry point {entry!r}: {target} defines no {attr!r}"
            + (f" (it defines: {', '.join(defined[:12])})" if defined else "")
        )
    if signature is None:
        return
    classes = {n: node for n, node in names.items() if isinstance(node, ast.ClassDef)}
    cls = _model_class(fn, classes)
    forward = _forward(cls) if cls is not None else None
    if cls is not None and forward is not None:
        check_forward(forward, cls.name, rel, signature)
