"""The hub's errors: branches of polymod's one hierarchy (:class:`~polymod.errors.PolymodError`).

Each also subclasses the nearest built-in, and carries the HTTP status the
server answers with, so one exception type means the same thing locally and
over the wire (the client re-raises the server's error as the same class).
"""

from __future__ import annotations

from polymod.errors import FormatError, PolymodError


class HubError(PolymodError):
    """Base of the hub's errors."""

    status = 400


class InvalidNameError(HubError, ValueError):
    """An owner, module name, version or reference is malformed."""

    status = 422


class NotFoundError(HubError, LookupError):
    """No such module, version, blob or user."""

    status = 404


class ConflictError(HubError, ValueError):
    """The version already exists with different content (versions are immutable)."""

    status = 409


class AuthError(HubError, PermissionError):
    """Missing, wrong or expired token, or no right to the namespace."""

    status = 401


class ForbiddenError(AuthError):
    """The token is valid but its user may not write to this namespace."""

    status = 403


class TooLargeError(HubError, ValueError):
    """An upload exceeds the hub's size limit."""

    status = 413


class IntegrityError(HubError, FormatError):
    """Content does not match its sha256, is truncated, or is not safetensors (e.g. a pickle)."""

    status = 422


ERRORS_BY_NAME = {cls.__name__: cls for cls in (HubError, InvalidNameError, NotFoundError, ConflictError, AuthError,
                                                ForbiddenError, TooLargeError, IntegrityError)}

__all__ = list(ERRORS_BY_NAME)
