"""One exception tree for Kiln. Each class carries the HTTP status it maps to.

    KilnError (500)
    ├── BadRequest (400)
    │   ├── InvalidSignature      a signature that does not parse or does not match the model
    │   ├── InvalidBundle         not a bundle, a corrupt file, an unsafe archive
    │   ├── InvalidEntryPoint     the entry point does not exist or does not build an nn.Module
    │   ├── InvalidOptions        unknown target, precision or policy
    │   └── InvalidInput          inference input that does not fit the signature
    ├── Unauthorized (401)        no token, or an unknown or revoked one
    ├── Forbidden (403)           a token without the scope, or a missing CSRF token
    ├── NotFound (404)
    ├── Conflict (409)
    ├── PayloadTooLarge (413)
    ├── Unavailable (503)
    │   └── SandboxUnavailable    the isolation boundary cannot be built here, so untrusted code won't run
    ├── StorageFull (507)         the artifact store or a disk is full
    └── ConversionError (500)     a step failed for a reason the user cannot fix by changing the request
        ├── SandboxError          user code crashed, hung or exceeded a limit in the sandbox
        └── RuntimeUnavailable    the runtime's library is not installed on this worker

Third-party errors are translated into these at the boundary; a route raises, it never builds error JSON.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""

    status: int = 500
    title: str = "Internal error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def __str__(self) -> str:
        return self.detail


class BadRequest(KilnError):
    status = 400
    title = "Bad request"


class InvalidSignature(BadRequest):
    title = "Invalid signature"


class InvalidBundle(BadRequest):
    title = "Invalid model bundle"


class InvalidEntryPoint(BadRequest):
    title = "Invalid entry point"


class InvalidOptions(BadRequest):
    title = "Invalid options"


class InvalidInput(BadRequest):
    title = "Invalid input"


class Unauthorized(KilnError):
    status = 401
    title = "Unauthorized"


class Forbidden(KilnError):
    status = 403
    title = "Forbidden"


class NotFound(KilnError):
    status = 404
    title = "Not found"


class Conflict(KilnError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(KilnError):
    status = 413
    title = "Payload too large"


class Unavailable(KilnError):
    status = 503
    title = "Service unavailable"


class SandboxUnavailable(Unavailable):
    """Untrusted code (model source, TorchScript) cannot run: the isolation boundary is missing here."""

    title = "Sandbox unavailable"


class Unloaded(Unavailable):
    """The model version a request was routed to was unloaded before it ran (a deployment change)."""


class Overloaded(Unavailable):
    """A deployment's queue is full: the request was refused at once, not queued."""


class StorageFull(KilnError):
    status = 507
    title = "Insufficient storage"


class ConversionError(KilnError):
    title = "Conversion failed"


class SandboxError(ConversionError):
    title = "Model code failed in the sandbox"


class RuntimeUnavailable(ConversionError):
    title = "Runtime unavailable"
