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


class HostMismatchWarning(UserWarning):
    """A module is loaded onto a host whose touched weights differ but fit."""
