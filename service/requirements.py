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

from packaging.markers import UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
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
            # only its type: the str() of a nested value can be as large as the YAML describes
            raise InvalidBundle(f"{source}: a requirement is a {type(item).__name__}, not a string like 'timm>=0.9'")
        try:
            _applies(Requirement(item))
        except InvalidRequirement as exc:
            why = str(exc).splitlines()[0] if str(exc) else "it does not parse"
            raise InvalidBundle(f"{source}: requirement {item[:200]!r} is not a PEP 508 requirement: {why}") from None
        except (UndefinedComparison, UndefinedEnvironmentName, InvalidVersion) as exc:
            why = f"{exc} is not a marker variable" if isinstance(exc, UndefinedEnvironmentName) else str(exc)
            raise InvalidBundle(
                f"{source}: requirement {item[:200]!r} has a marker that cannot be evaluated: {why[:200]}"
            ) from None
        parsed.append(item.strip())
    return parsed


def unmet(requirements: list[str], *, where: str = "this server") -> list[str]:
    """One sentence per requirement this environment does not meet; those whose marker does not apply
    here (`; python_version < "3.10"`) are skipped."""
    problems = []
    for text in requirements:
        req = Requirement(text)
        if not _applies(req):
            continue
        wanted = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "") + str(req.specifier)
        installed, meets = _installed(req)
        if installed is None:
            problems.append(f"bundle requires {wanted}: not installed on {where} (pip install {shlex.quote(wanted)})")
            continue
        if not meets:
            problems.append(f"bundle requires {wanted}: {where} has {installed}")
            continue
        problems += [f"bundle requires {wanted}: {p}" for p in _unmet_extras(req, installed, where)]
    return problems


def _applies(req: Requirement, extra: str = "") -> bool:
    """Whether the requirement's marker holds here (for `extra`); raises what packaging raises for a
    marker that cannot be evaluated (parse() turns that into a one-line refusal)."""
    return req.marker is None or bool(req.marker.evaluate({"extra": extra}))


def _unmet_extras(req: Requirement, installed: str, where: str) -> list[str]:
    """What the extras of an installed distribution (`pydantic[email]`) need that is not here."""
    if not req.extras:
        return []
    meta = importlib.metadata.metadata(req.name)
    declared = {canonicalize_name(e) for e in meta.get_all("Provides-Extra") or []}
    deps = []
    for text in importlib.metadata.requires(req.name) or []:
        try:
            deps.append(Requirement(text))
        except InvalidRequirement:
            continue
    problems = []
    for extra in sorted(req.extras):
        if canonicalize_name(extra) not in declared:
            problems.append(f"{req.name} {installed} on {where} has no extra {extra!r}")
            continue
        for dep in deps:
            try:
                needed = dep.marker is not None and _applies(dep, extra) and not _applies(dep)
            except (UndefinedComparison, UndefinedEnvironmentName, InvalidVersion):
                needed = False
            if not needed:
                continue
            have, meets = _installed(dep)
            if have is None:
                problems.append(f"its extra {extra!r} needs {dep.name}{dep.specifier}, not installed on {where}")
                continue
            if not meets:
                problems.append(f"its extra {extra!r} needs {dep.name}{dep.specifier}; {where} has {have}")
    return problems


def check(requirements: list[str], *, where: str = "this server") -> None:
    """Refuse, in one line naming all of them, requirements this environment does not meet."""
    if problems := unmet(requirements, where=where):
        raise InvalidBundle("; ".join(problems))


def _installed(req: Requirement) -> tuple[str | None, bool]:
    """The installed version of the requirement's distribution (None when it is not installed here),
    and whether that version meets the requirement's specifier."""
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return None, False
    return installed, _satisfies(req, installed)


def _satisfies(req: Requirement, installed: str) -> bool:
    if not req.specifier:
        return True
    try:
        version = Version(installed)
    except InvalidVersion:  # an installed version that PEP 440 cannot order meets no version bound
        return False
    return req.specifier.contains(version, prereleases=True)
