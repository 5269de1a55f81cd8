"""Model signatures: named inputs and outputs, dtypes, and shapes with named dynamic dimensions.

A shape is a list whose items are integers (static) or names of dynamic dimensions
(``["batch", 3, 224, 224]``). Every named dimension has a min/opt/max range; ranges left
out get defaults. Only numpy is needed here, so the API can check a signature cheaply.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.errors import InvalidSignature
from service.options import KIND_ALIASES, OUTPUT_KINDS

# Canonical dtype names, with the aliases people type.
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "long": "int64",
    "uint8": "uint8",
    "bool": "bool",
}
FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}
DEFAULT_BATCH_RANGE = (1, 4, 16)
DEFAULT_DIM_RANGE = (1, 32, 128)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")
# Bounds a signature must keep, checked in time linear in its size before anything else runs.
MAX_TENSORS = 256  # inputs, and outputs
MAX_RANK = 32
MAX_NAME = 128  # characters of a tensor or dimension name
MAX_DIM = (1 << 31) - 1  # largest size of a dimension
MAX_SAMPLE_BYTES = 1 << 30  # one sample with every dynamic dimension at its max, all inputs together
ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "bool": 1,
}


def canonical_dtype(name: str) -> str:
    """The canonical name of a dtype, or InvalidSignature naming the ones Kiln knows."""
    key = str(name).strip().lower()
    if key not in DTYPE_ALIASES:
        known = ", ".join(sorted(set(DTYPE_ALIASES.values())))
        raise InvalidSignature(f"unsupported dtype {name!r}; use one of: {known}")
    return DTYPE_ALIASES[key]


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype for a canonical dtype name (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


class DimRange(BaseModel):
    """The range a dynamic dimension takes: smallest, the size to optimise for, largest."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(ge=0, le=MAX_DIM)
    opt: int = Field(ge=0, le=MAX_DIM)
    max: int = Field(ge=1, le=MAX_DIM)

    @model_validator(mode="after")
    def _ordered(self) -> DimRange:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self


class TensorSpec(BaseModel):
    """One named input or output. Outputs may leave dtype and shape to be inferred."""

    model_config = ConfigDict(extra="forbid")
    name: str
    dtype: str | None = None
    shape: list[int | str] | None = None
    # For integer inputs: the half-open range generated sample values are drawn from
    # (token ids must stay below the vocabulary size).
    value_range: tuple[float, float] | None = None
    # For outputs: what the output is, which decides how candidates are compared with it
    # (service.options.OUTPUT_KINDS: scores, embedding, regression, ids, mask, or an alias).
    kind: str | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str | None) -> str | None:
        if v is None:
            return v
        k = KIND_ALIASES.get(v.strip().lower(), v.strip().lower())
        if k not in OUTPUT_KINDS:
            raise ValueError(f"unknown output kind {v!r}; known: {', '.join(OUTPUT_KINDS + tuple(KIND_ALIASES))}")
        return k

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > MAX_NAME:
            raise ValueError(f"a tensor name may have at most {MAX_NAME} characters, not {len(v)}")
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a valid tensor name (letters, digits, _ . : / -)")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        return None if v is None else canonical_dtype(v)

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int | str] | None) -> list[int | str] | None:
        if v is None:
            return v
        if len(v) > MAX_RANK:
            raise ValueError(f"a tensor may have at most {MAX_RANK} dimensions, not {len(v)}")
        for d in v:
            if isinstance(d, int) and d > MAX_DIM:
                raise ValueError(f"dimension {d} is larger than {MAX_DIM}")
            if isinstance(d, str) and len(d) > MAX_NAME:
                raise ValueError(f"a dimension name may have at most {MAX_NAME} characters")
            if isinstance(d, int) and d < 0:
                raise ValueError(f"dimension {d} is negative; name a dynamic dimension instead of -1")
            if isinstance(d, str) and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", d):
                raise ValueError(f"dimension name {d!r} must be an identifier")
        return v

    @property
    def dynamic_dims(self) -> list[str]:
        return [d for d in (self.shape or []) if isinstance(d, str)]


class Signature(BaseModel):
    """Inputs, outputs and the ranges of the named dynamic dimensions they use."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec] = Field(default_factory=list)
    dims: dict[str, DimRange] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete(self) -> Signature:
        if not self.inputs:
            raise ValueError("a signature needs at least one input")
        for spec in self.inputs:
            if spec.dtype is None or spec.shape is None:
                raise ValueError(f"input {spec.name!r} needs a dtype and a shape")
        names = Counter(t.name for t in self.inputs + self.outputs)
        dupes = sorted(n for n, k in names.items() if k > 1)
        if dupes:
            raise ValueError(f"tensor names must be unique: {', '.join(dupes)}")
        used = {d for t in self.inputs + self.outputs for d in t.dynamic_dims}
        unknown = sorted(set(self.dims) - used)
        if unknown:
            raise ValueError(f"ranges given for dimensions no tensor uses: {', '.join(unknown)}")
        for name in sorted(used - set(self.dims)):
            lo, opt, hi = DEFAULT_BATCH_RANGE if name == self.batch_dim_name(used) else DEFAULT_DIM_RANGE
            self.dims[name] = DimRange(min=lo, opt=opt, max=hi)
        largest = sum(
            ITEMSIZE.get(t.dtype or "", 8) * math.prod(self.concrete_shape(t, self.sizes_at("max")))
            for t in self.inputs
        )
        if largest > MAX_SAMPLE_BYTES:
            raise ValueError(
                f"one sample at the dimensions' max sizes would take {largest / (1 << 30):.1f} GiB "
                f"(more than {MAX_SAMPLE_BYTES >> 30} GiB); lower the max of the dynamic dimensions"
            )
        return self

    def batch_dim_name(self, used: set[str] | None = None) -> str | None:
        """The dynamic dimension that every input has first, if any: the one batching joins on."""
        firsts = {t.shape[0] if t.shape else None for t in self.inputs}
        if len(firsts) == 1:
            first = firsts.pop()
            if isinstance(first, str):
                return first
        return None

    @property
    def batch_dim(self) -> str | None:
        return self.batch_dim_name()

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def concrete_shape(self, spec: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape of a tensor with each named dimension set from `sizes`."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape or [])

    def sizes_at(self, point: str, **overrides: int) -> dict[str, int]:
        """Every dynamic dimension at its 'min', 'opt' or 'max', with overrides."""
        sizes = {name: getattr(r, point) for name, r in self.dims.items()}
        sizes.update(overrides)
        return sizes

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    # --- parsing -----------------------------------------------------------------------

    @classmethod
    def parse(cls, data: Any) -> Signature:
        """A signature from a dict (as found in kiln.yaml / kiln.json), with readable errors."""
        if isinstance(data, Signature):
            return data
        if not isinstance(data, dict):
            raise InvalidSignature("a signature must be an object with 'inputs' (and optionally 'outputs', 'dims')")
        data = dict(data)
        for key in ("inputs", "outputs"):
            items = data.get(key)
            if isinstance(items, list) and len(items) > MAX_TENSORS:
                raise InvalidSignature(f"a signature may have at most {MAX_TENSORS} {key}, not {len(items)}")
            if isinstance(items, list):
                data[key] = [parse_tensor_spec(i) if isinstance(i, str) else i for i in items]
        dims = data.get("dims")
        if isinstance(dims, dict) and len(dims) > MAX_TENSORS * MAX_RANK:
            raise InvalidSignature(f"a signature may name at most {MAX_TENSORS * MAX_RANK} dimensions")
        if isinstance(dims, dict):
            data["dims"] = {k: _parse_range(k, v) for k, v in dims.items()}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidSignature(f"signature does not parse: {_first_error(exc)}") from None

    @classmethod
    def parse_text(cls, text: str, *, source: str = "signature") -> Signature:
        """A signature from JSON or YAML text."""
        return cls.parse(load_mapping(text, source=source))

    @classmethod
    def from_file(cls, path: str | Path) -> Signature:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidSignature(f"cannot read signature file {path}: {exc.strerror}") from None
        data = load_mapping(text, source=str(path))
        return cls.parse(data.get("signature", data))


def _no_alias_loader(yaml: Any) -> Any:
    """YAML's safe loader, refusing aliases (`*name`): ten nested aliases of ten items each describe
    10**10 values in a few hundred bytes, which every later walk over the document would expand."""

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.events.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted", mark)
            return super().compose_node(parent, index)

    return NoAliases


def load_mapping(text: str, *, source: str) -> dict[str, Any]:
    """Parse JSON or YAML text into a dict, or InvalidSignature saying where it broke."""
    try:
        data = json.loads(text)
    except ValueError:
        import yaml

        try:
            data = yaml.load(text, Loader=_no_alias_loader(yaml))
        except yaml.YAMLError as exc:
            raise InvalidSignature(f"{source} is neither JSON nor YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InvalidSignature(f"{source} must hold an object, not {type(data).__name__}")
    return data


_SPEC = re.compile(r"^\s*([^:\[\]\s]+)\s*:\s*([A-Za-z0-9]+)\s*(?:\[(.*)\])?\s*$")


def parse_tensor_spec(text: str) -> dict[str, Any]:
    """``'x:float32[batch,3,224,224]'`` -> a TensorSpec dict. A bare name is an output to infer."""
    if ":" not in text:
        return {"name": text.strip()}
    m = _SPEC.match(text)
    if not m:
        raise InvalidSignature(f"cannot parse tensor spec {text!r}; write it as name:dtype[dim,dim,...]")
    name, dtype, dims = m.groups()
    shape: list[int | str] = []
    if dims is not None and dims.strip():
        for d in dims.split(","):
            d = d.strip()
            shape.append(int(d) if d.lstrip("-").isdigit() else d)
    return {"name": name, "dtype": dtype, "shape": shape}


def parse_dim_range(text: str) -> tuple[str, DimRange]:
    """``'batch=1:8:32'`` -> ('batch', DimRange(1, 8, 32))."""
    name, _, rest = text.partition("=")
    parts = rest.split(":")
    if not name or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise InvalidSignature(f"cannot parse dimension range {text!r}; write it as name=min:opt:max")
    return name.strip(), _parse_range(name, [int(p) for p in parts])


def _parse_range(name: str, value: Any) -> DimRange:
    if isinstance(value, DimRange):
        return value
    try:
        if isinstance(value, (list, tuple)) and len(value) == 3:
            return DimRange(min=value[0], opt=value[1], max=value[2])
        if isinstance(value, dict):
            return DimRange.model_validate(value)
    except ValidationError as exc:
        raise InvalidSignature(f"range of dimension {name!r}: {_first_error(exc)}") from None
    raise InvalidSignature(f"range of dimension {name!r} must be [min, opt, max] or {{min, opt, max}}")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
