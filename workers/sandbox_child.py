"""The sandbox child: ``python -m workers.sandbox_child WORKDIR RESULT_FD``, started by
``workers.sandbox.run_op``.

Reads the request (``{"op", "args"}``) from stdin, calls ``OPS[op](args, workdir)`` and writes to
descriptor RESULT_FD ``{"ok": true, "result": {...}}``, or ``{"ok": false, "error": {"type",
"message", "traceback", "errno", "kiln_error"}}`` for any exception. The limits are already in
place when this runs; it only has to report faithfully.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from service.errors import KilnError


def main(workdir: Path, result_fd: int) -> None:
    """Run the requested op and write its result, or the error it raised, to `result_fd`."""
    try:
        request = json.loads(sys.stdin.buffer.read())
        from workers.sandbox_ops import OPS

        fn = OPS.get(request["op"])
        if fn is None:
            raise LookupError(f"unknown sandbox op {request['op']!r}")
        result = fn(request["args"], workdir)
        if not isinstance(result, dict):
            raise TypeError(f"sandbox op {request['op']!r} returned {type(result).__name__}, not a dict")
        reply = json.dumps({"ok": True, "result": result})
    # BaseException: model code may call sys.exit() or raise KeyboardInterrupt; that is an error too.
    except BaseException as exc:  # noqa: BLE001 - see above
        reply = json.dumps({"ok": False, "error": _describe(exc)})
    data = reply.encode()
    while data:
        data = data[os.write(result_fd, data) :]
    os.close(result_fd)


def _where(exc: BaseException) -> str | None:
    """file:line of the innermost frame in the model's own code (not Python's, a library's or Kiln's),
    relative to the bundle; None when the error came from elsewhere."""
    import sysconfig

    kiln = Path(__file__).resolve().parents[1]
    skip = tuple(
        {
            str(Path(p).resolve()) + os.sep
            for p in (sysconfig.get_path("stdlib"), sysconfig.get_path("purelib"), sysconfig.get_path("platlib"))
        }
        | {str(kiln / "service") + os.sep, str(kiln / "workers") + os.sep}
    )
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        name = frame.filename
        if name.startswith("<") or name.startswith(skip) or str(Path(name).resolve()).startswith(skip):
            continue
        return f"{name.rsplit('/bundle/', 1)[1] if '/bundle/' in name else Path(name).name}:{frame.lineno}"
    return None


def _describe(exc: BaseException) -> dict[str, Any]:
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - model code controls __str__
        message = f"<unprintable {type(exc).__name__}>"
    return {
        "type": type(exc).__name__,
        "message": message,
        "traceback": "".join(traceback.format_exception(exc)),
        "where": _where(exc),
        # the parent tells EFBIG (file size limit) from other OSErrors by it
        "errno": exc.errno if isinstance(exc, OSError) else None,
        # the parent re-raises these as the same service.errors class
        "kiln_error": type(exc).__name__ if isinstance(exc, KilnError) else None,
    }


if __name__ == "__main__":
    status = 1
    try:
        main(Path(sys.argv[1]), int(sys.argv[2]))
        sys.stdout.flush()
        sys.stderr.flush()
        status = 0
    except BaseException:  # noqa: BLE001 - whatever ended the op, the log says why
        traceback.print_exc()  # no result file: the parent reports a crash and this shows why in the log
    finally:
        # os._exit skips interpreter shutdown, so a non-daemon thread left by model code cannot hang us.
        os._exit(status)
