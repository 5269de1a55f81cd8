"""What a bundle needs installed: the PEP 508 `requirements` of its manifest.

They are checked against the Python environment of the process that checks them
(`importlib.metadata`): the API's at upload, and the worker's again before the load step imports
any of the bundle's code, since a worker may have another environment than the API. Nothing is
ever installed; an unmet requirement is refused in one line that names every unmet one.
"""

from __future__ import annotations

import importlib.metadata
import shlex
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from service.errors import InvalidBundle

MAX_REQUIREMENTS = 256  # a bundle's own list; longer ones are refused before any is parsed


def parse(value: Any, *, source: str = "kiln.yaml") -> list[str]:
    """The manifest's `requirements` as PEP 508 strings; anything else is refused in one line."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidBundle(
            f"{source}: 'requirements' must be a list of requirement strings (e.g. ['timm', 'transformers>=4.40']), "
            f"not {type(value).__name__}"
        )
    if len(value) > MAX_REQUIREMENTS:
        raise InvalidBundle(f"{source}: {len(value)} requirements; at most {MAX_REQUIREMENTS} are accepted")
    parsed = []
    for item in value:
        if not isinstance(item, str):
            raise InvalidBundle(
                f"{source}: requirement {str(item)[:100]!r} is not a string like 'timm>=0.9' ({type(item).__name__})"
            )
        try:
            Requirement(item)
        except InvalidRequirement as exc:
            why = str(exc).splitlines()[0] if str(exc) else "it does not parse"
            raise InvalidBundle(f"{source}: requirement {item[:200]!r} is not a PEP 508 requirement: {why}") from None
        parsed.append(item.strip())
    return parsed


def unmet(requirements: list[str], *, where: str = "this server") -> list[str]:
    """One sentence per requirement this environment does not meet; those whose marker does not apply
    here (`; python_version < "3.10"`) are skipped."""
    problems = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        wanted = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "") + str(req.specifier)
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"bundle requires {wanted}: not installed on {where} (pip install {shlex.quote(wanted)})")
            continue
        if not _satisfies(req, installed):
            problems.append(f"bundle requires {wanted}: {where} has {installed}")
    return problems


def check(requirements: list[str], *, where: str = "this server") -> None:
    """Refuse, in one line naming all of them, requirements this environment does not meet."""
    if problems := unmet(requirements, where=where):
        raise InvalidBundle("; ".join(problems))


def _satisfies(req: Requirement, installed: str) -> bool:
    if not req.specifier:
        return True
    try:
        version = Version(installed)
    except InvalidVersion:  # an installed version that PEP 440 cannot order meets no version bound
        return False
    return req.specifier.contains(version, prereleases=True)
