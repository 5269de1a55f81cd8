"""Model bundles: classify an upload, unpack archives safely, read the manifest.

Nothing here executes user code or unpickles anything: the API can check uploads with it, and
workers use it to lay a bundle out in a job's working directory before the sandbox runs it.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from service.errors import InvalidBundle
from service.onnx_policy import check_onnx
from service.pysource import check_python_bundle
from service.requirements import parse as parse_requirements
from service.signature import Signature, load_mapping

# Kinds of bundle: Python source to build, or an already captured graph.
PYTHON, TORCHSCRIPT, EXPORTED, ONNX = "python", "torchscript", "export", "onnx"
MANIFEST_NAMES = ("kiln.yaml", "kiln.yml", "kiln.json")
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few lines; a larger one is refused before it is parsed
DEFAULT_ENTRY = "model.py:build_model"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may expand to before it is refused, unread."""

    max_members: int = 10_000
    max_total_bytes: int = 16 << 30
    max_ratio: float = 200.0  # uncompressed / compressed, per archive


@dataclass
class Bundle:
    """A bundle laid out in a directory, ready for the pipeline."""

    kind: str
    root: Path
    entry: str | None = None
    model_file: Path | None = None  # the captured graph, for torchscript/export/onnx bundles
    weights: Path | None = None
    samples: Path | None = None
    signature: Signature | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    requirements: list[str] = field(default_factory=list)  # PEP 508 strings (service/requirements.py)

    def describe(self) -> dict[str, Any]:
        rel = lambda p: str(p.relative_to(self.root)) if p else None  # noqa: E731 - a one-line helper local to this function
        return {
            "kind": self.kind,
            "entry": self.entry,
            "model_file": rel(self.model_file),
            "weights": rel(self.weights),
            "samples": rel(self.samples),
        }


def sniff_kind(path: Path) -> str:
    """What kind of upload a file is, by its name and its first bytes (never by unpickling)."""
    name = path.name.lower()
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise InvalidBundle(f"cannot read {path.name}: {exc.strerror}") from None
    if not head:
        raise InvalidBundle(f"{path.name} is empty (0 bytes)")
    if name.endswith(".py"):
        return PYTHON
    if name.endswith(ENGINE_SUFFIXES):
        raise InvalidBundle(
            f"{path.name}: TensorRT engines are not accepted as uploads (an engine is native code "
            "for one GPU and TensorRT version); upload the model or its ONNX and Kiln builds the engine"
        )
    if name.endswith(".onnx"):
        return ONNX
    if name.endswith(".pt2"):
        return EXPORTED
    if name.endswith((".pt", ".pth", ".torchscript")):
        if not zipfile.is_zipfile(path):
            raise InvalidBundle(f"{path.name} is not a TorchScript archive (legacy pickled .pt files are not accepted)")
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any("/code/" in n for n in names):
            return TORCHSCRIPT
        raise InvalidBundle(
            f"{path.name} looks like a state dict, not a TorchScript module: upload it as weights "
            "together with the model's code"
        )
    if name.endswith(".zip") or name.endswith((".tar.gz", ".tgz", ".tar")):
        return "archive"
    if head.startswith(b"PK\x03\x04"):
        return "archive"
    if head[:2] == b"\x1f\x8b":
        return "archive"
    raise InvalidBundle(
        f"{path.name} is not a model bundle: expected a .py file, a .zip or .tar.gz of files, "
        "a TorchScript .pt, a torch.export .pt2 or an .onnx model"
    )


def safe_extract(archive: Path, dest: Path, limits: ArchiveLimits = ArchiveLimits()) -> None:
    """Unpack a zip or tar archive, refusing escaping paths, links, devices and bombs before writing anything."""
    dest.mkdir(parents=True, exist_ok=True)
    compressed = max(archive.stat().st_size, 1)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            entries = zf.infolist()
            members = [(i.filename, i.file_size, _zip_kind(i)) for i in entries]
            _check_members(archive.name, members, compressed, limits)
            for entry in entries:
                if not entry.is_dir():
                    _copy_limited(zf.open(entry), dest / _safe_name(entry.filename), entry.file_size)
        return
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115 - opened apart so its error becomes a refusal; closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise InvalidBundle(f"{archive.name} is neither a zip nor a tar archive: {exc}") from None
    with tf:
        try:
            infos = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidBundle(f"{archive.name} is a corrupt tar archive: {exc}") from None
        members = [(i.name, i.size, "dir" if i.isdir() else "file" if i.isfile() else "link") for i in infos]
        _check_members(archive.name, members, compressed, limits)
        for info in infos:
            if info.isfile():
                src = tf.extractfile(info)
                assert src is not None
                _copy_limited(src, dest / _safe_name(info.name), info.size)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.is_dir():
        return "dir"
    if mode and (stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or mode & 0o170000 == 0)):
        return "link"
    return "file"


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")) or (p.parts and ":" in p.parts[0]):
        raise InvalidBundle(f"archive member {name!r} would be written outside the bundle directory")
    return p


def _check_members(archive: str, members: list[tuple[str, int, str]], compressed: int, limits: ArchiveLimits) -> None:
    if len(members) > limits.max_members:
        raise InvalidBundle(f"{archive} has {len(members)} members; at most {limits.max_members} are accepted")
    total = 0
    for name, size, kind in members:
        _safe_name(name)
        if kind == "link":
            raise InvalidBundle(f"archive member {name!r} is a link or special file; only regular files are accepted")
        total += size
    if total > limits.max_total_bytes:
        raise InvalidBundle(f"{archive} expands to {total} bytes, over the limit of {limits.max_total_bytes}")
    if total / compressed > limits.max_ratio and total > (1 << 20):
        raise InvalidBundle(
            f"{archive} expands {total / compressed:.0f}x (over {limits.max_ratio:.0f}x): "
            "refused as a likely archive bomb"
        )


def _copy_limited(src: Any, target: Path, declared: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with src, target.open("wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > declared:
                raise InvalidBundle(f"archive member {target.name} is larger than its header says")
            out.write(chunk)


def prepare_bundle(
    upload: Path,
    root: Path,
    *,
    entry: str | None = None,
    weights: Path | None = None,
    samples: Path | None = None,
    signature: Signature | dict | str | None = None,
    limits: ArchiveLimits = ArchiveLimits(),
) -> Bundle:
    """Lay an upload (and optional weights/samples files) out under `root` and describe it.

    Explicit arguments override what the bundle's manifest (kiln.yaml / kiln.json) says.
    """
    upload = Path(upload)
    if not upload.exists():
        raise InvalidBundle(f"bundle {upload} does not exist")
    kind = "directory" if upload.is_dir() else sniff_kind(upload)
    if root.exists():
        shutil.rmtree(root)
    model_file = None
    if kind == "directory":  # a local folder (the CLI); uploads are always files
        links = [p for p in upload.rglob("*") if p.is_symlink()]
        if links:
            raise InvalidBundle(f"bundle folder holds a link ({links[0]}); only regular files are accepted")
        shutil.copytree(upload, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        root.mkdir(parents=True)
    if kind == "directory":
        kind = PYTHON  # copied above
    elif kind == "archive":
        safe_extract(upload, root, limits)
        kind = PYTHON
    elif kind == PYTHON:
        shutil.copyfile(upload, root / upload.name)
        entry = entry or f"{upload.name}:build_model"
    else:
        model_file = root / upload.name
        shutil.copyfile(upload, model_file)
        if kind == ONNX:
            check_onnx_upload(model_file)

    manifest = _read_manifest(root)
    requirements = parse_requirements(manifest.get("requirements"), source=_manifest_name(root))
    entry = entry or manifest.get("entry")
    weights_path = _resolve(root, manifest.get("weights"), "weights")
    samples_path = _resolve(root, manifest.get("samples"), "samples")
    if weights is not None:
        weights_path = root / ("weights" + "".join(Path(weights).suffixes[-1:]))
        shutil.copyfile(weights, weights_path)
    if samples is not None:
        samples_path = root / "samples.npz"
        shutil.copyfile(samples, samples_path)
    if weights_path is not None and weights_path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise InvalidBundle(f"weights file {weights_path.name} must be .safetensors or a state-dict .pt")

    sig_data: Any = signature if signature is not None else manifest.get("signature")
    if sig_data is None and "inputs" in manifest:
        sig_data = {k: manifest[k] for k in ("inputs", "outputs", "dims") if k in manifest}
    sig = None
    if isinstance(sig_data, str):
        sig = Signature.parse_text(sig_data)
    elif sig_data is not None:
        sig = Signature.parse(sig_data)

    if kind == PYTHON:
        if entry is None:
            if (root / "model.py").is_file():
                entry = DEFAULT_ENTRY
            else:
                raise InvalidBundle(
                    "the bundle has no model.py and no entry point was given; "
                    "pass --entry file.py:function or set 'entry' in kiln.yaml"
                )
        target = entry.partition(":")[0]
        if target.endswith(".py") and not (root / target).is_file():
            raise InvalidBundle(
                f"entry point file {target!r} is not in the bundle "
                f"(it holds: {', '.join(sorted(p.name for p in root.iterdir())[:10])})"
            )
        check_python_bundle(root, entry, sig)  # reads the source; runs none of it
    return Bundle(
        kind=kind,
        root=root,
        entry=entry if kind == PYTHON else None,
        model_file=model_file,
        weights=weights_path,
        samples=samples_path,
        signature=sig,
        manifest=manifest,
        requirements=requirements,
    )


def _read_manifest(root: Path) -> dict[str, Any]:
    for name in MANIFEST_NAMES:
        path = root / name
        if path.is_file():
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise InvalidBundle(
                    f"{name} is {path.stat().st_size} bytes; a manifest may have at most {MAX_MANIFEST_BYTES} bytes"
                )
            try:
                return load_mapping(path.read_text(), source=name)
            except Exception as exc:  # noqa: BLE001 - reported as a bundle problem
                raise InvalidBundle(f"{name} does not parse: {exc}") from None
    return {}


def _manifest_name(root: Path) -> str:
    return next((name for name in MANIFEST_NAMES if (root / name).is_file()), "kiln.yaml")


def _resolve(root: Path, rel: Any, what: str) -> Path | None:
    if rel is None:
        return None
    path = (root / str(rel)).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise InvalidBundle(f"{what} file {rel!r} named in the manifest is not in the bundle")
    return path


def check_onnx_upload(path: Path) -> None:
    """An uploaded ONNX model is one file of standard operators (service/onnx_policy.py)."""
    check_onnx(path)


def onnx_signature(bundle: Bundle) -> Signature:
    """A signature read off an ONNX model's graph inputs (named dims are dynamic)."""
    import onnx

    if bundle.model_file is None:
        raise InvalidBundle("the bundle has no ONNX model file")
    try:
        model = onnx.load(str(bundle.model_file), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise InvalidBundle(f"{bundle.model_file.name} is not a valid ONNX model: {str(exc)[:200]}") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = []
    for inp in (x for x in model.graph.input if x.name not in inits):
        tt = inp.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        except Exception:  # noqa: BLE001 - an element type numpy has no name for
            raise InvalidBundle(f"ONNX input {inp.name!r} has an unsupported element type {tt.elem_type}") from None
        shape: list[int | str] = []
        for axis, d in enumerate(tt.shape.dim):
            if d.dim_value > 0:
                shape.append(d.dim_value)
            elif d.dim_param and d.dim_param.isidentifier():
                shape.append(d.dim_param)
            else:
                shape.append("batch" if axis == 0 else f"{inp.name}_d{axis}".replace(".", "_"))
        inputs.append({"name": inp.name, "dtype": dtype, "shape": shape})
    return Signature.parse({"inputs": inputs})
