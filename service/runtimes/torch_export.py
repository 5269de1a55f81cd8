"""torch.export artifacts: an ExportedProgram (`.pt2` from torch.export.save) run as its module, and
an AOTInductor package (`.pt2` holding a compiled shared library) run through its loader.

Both carry code: an ExportedProgram is unpickled when it loads, and a package is native code that
runs when it loads. So both are loaded only inside the isolation boundary (`runs_code`): in a runner
process (service/runner.py) or a sandbox op. They take the inputs in the signature's order and
return the outputs as a flat tuple in its order, like TorchScript artifacts, whose input and output
handling they share.
"""

from __future__ import annotations

from typing import Any

from service.runtimes.torchscript import TorchScriptRuntime


class ExportedProgramRuntime(TorchScriptRuntime):
    """Runs an ExportedProgram `.pt2` through `torch.export.load(path).module()`."""

    name = "torch_export"
    library = "torch"
    runs_code = True  # unpickling the program runs code

    def load_module(self) -> Any:
        import torch

        module = torch.export.load(str(self.path)).module()
        return module.to(self.device) if self.device != "cpu" else module


class AOTInductorRuntime(TorchScriptRuntime):
    """Runs an AOTInductor package (`torch._inductor.aoti_load_package`). Loading extracts the
    package's shared library into a temporary directory (TMPDIR; in a runner's box, its /tmp)."""

    name = "aotinductor"
    library = "torch"
    runs_code = True  # a compiled shared library

    def load_module(self) -> Any:
        import torch._inductor

        package = torch._inductor.aoti_load_package(str(self.path))
        loader = getattr(package, "loader", None)
        if loader is None:
            return package
        # The package's own __call__ flattens its arguments and unflattens its results with pytree on
        # every call: 20-30 us, a third of the MLP's time at batch 1. Kiln's programs take and return
        # flat tensors in the signature's order, which is what its loader runs.
        return lambda *args: loader.run(list(args))
