"""The service never imports workers, and imports no heavy library (torch, tensorrt, onnxruntime, openvino)
when it starts: checked in a fresh interpreter, where nothing else has loaded them first."""

import subprocess
import sys

CHECK = """
import sys
import service.app, service.client, service.runtimes, service.serving.manager, service.dashboard
print(",".join(m for m in ("workers", "torch", "tensorrt", "onnxruntime", "openvino", "nncf") if m in sys.modules))
"""


def test_service_imports_no_workers_and_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"
