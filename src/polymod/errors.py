"""polymod's one error hierarchy.

Every error raised for bad input is a :class:`PolymodError` and also a subclass
of the nearest built-in, so ``except ValueError`` keeps working for callers that
do not know polymod. Messages say what was received, what was expected and how
to fix it.
"""

from __future__ import annotations


class PolymodError(Exception):
    """Root of every error polymod raises on purpose."""


class ConfigError(PolymodError, ValueError):
    """A configuration value (module spec, recipe, argument) is invalid."""


class UnknownArgumentError(ConfigError, TypeError):
    """A keyword argument the callee does not take (often another library's name for one it does).

    Also a ``TypeError``, which is what Python raises for an unexpected keyword argument.
    """


class SiteNotFoundError(PolymodError, LookupError):
    """A site selection matched nothing in the host."""


class UnknownModuleError(PolymodError, KeyError):
    """A module name is not in the model's library."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class IncompatibleHostError(PolymodError, ValueError):
    """A module does not fit the host it is attached or loaded onto."""


class StateError(PolymodError, RuntimeError):
    """An operation is not valid in the current state (e.g. merging twice)."""


class FormatError(PolymodError, ValueError):
    """A file on disk is not a valid polymod artefact (bad JSON, bad weights)."""


class CompositionError(PolymodError, ValueError):
    """A composition expression (Stack, Mix, Parallel) is invalid."""


# The module hub's errors. Each carries the HTTP status the hub server answers with, so one exception
# type means the same thing locally and over the wire (the remote client re-raises the server's error
# as the same class, found by name in HUB_ERRORS).

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


class BusyError(HubError, TimeoutError):
    """The hub's index stayed locked by other writers past the wait limit: retry shortly (HTTP 503)."""

    status = 503


class DestinationError(HubError, FileExistsError):
    """A pull may not write to the destination: it holds the user's own files (or edited pulled ones)."""

    status = 409


class IntegrityError(HubError, FormatError):
    """Content does not match its sha256, is truncated, or is not safetensors (e.g. a pickle)."""

    status = 422


HUB_ERRORS = {cls.__name__: cls for cls in (HubError, InvalidNameError, NotFoundError, ConflictError, AuthError,
                                           ForbiddenError, TooLargeError, IntegrityError, DestinationError,
                                           BusyError)}


class HostMismatchWarning(UserWarning):
    """A module is loaded onto a host whose touched weights differ but fit."""


class InactiveModuleWarning(UserWarning):
    """A training forward runs with trainable modules attached but none active (they get no gradient)."""
