"""Reading foreign configs by allow-list: every key understood, or refused by name.

A reader of another library's config (PEFT's ``adapter_config.json``,
AdapterHub ``adapters``' ``config``) must never load what it only half
understands: an option it ignores may change the adapter's function (DoRA,
PiSSA's residual base, aLoRA's activation rule), and the result is then a
silent wrong answer. So each config class gets a table — data, one
:class:`Option` per key — and :func:`check` holds a config against it:

* an **exact** option is read into the polymod module (for the values its
  ``accepts`` allows; other values are refused with its ``refusal``);
* an option with **no effect** on the adapter's function (metadata, training-
  or initialisation-only settings whose result is in the saved tensors) is
  accepted with any value;
* a **refused** option is accepted only at its default value;
* a key the table does not know (an option of a newer version) is refused
  unless its value is empty (None, False, ``{}``, ``[]``, ``""``).

Every problem of a config is reported at once, each by its key, with the
reason and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from polymod.errors import FormatError

Status = Literal["exact", "no effect", "refused"]


@dataclass(frozen=True)
class Option:
    """How a reader treats one key of a foreign config.

    Attributes:
        default: the key's default in the foreign library (always accepted).
        status: ``exact`` (read into the module), ``no effect`` (accepted, changes nothing
            polymod computes) or ``refused`` (only the default is accepted).
        note: for exact and no-effect options, what polymod does with the value.
        refusal: why other values are refused and what to do instead (refused options, and
            exact options whose ``accepts`` limits the values).
        accepts: for exact options, which non-default values are read (None: every value).
    """

    default: Any
    status: Status
    note: str = ""
    refusal: str = ""
    accepts: Callable[[Any], bool] | None = None

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is read (or harmlessly accepted) rather than refused."""
        if same(value, self.default) or self.status == "no effect":
            return True
        if self.status == "refused":
            return False
        return self.accepts is None or bool(self.accepts(value))


def empty(value: Any) -> bool:
    """None, False and empty containers/strings: what an unset option looks like in any library."""
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and len(value) == 0)


def same(value: Any, default: Any) -> bool:
    """``value`` equals ``default``, counting every empty value as equal to an empty default."""
    if empty(value) and empty(default):
        return True
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return bool(value == default)


def check(config: Mapping[str, Any], table: Mapping[str, Option], what: str) -> None:
    """Refuse ``config`` unless every key is allowed by ``table``.

    Args:
        config: the foreign config (a JSON object).
        table: one :class:`Option` per known key.
        what: the config's name in messages (``PEFT LoraConfig``).

    Raises:
        FormatError: naming every refused key with its value, the reason and the fix.
    """
    problems = []
    for key, value in config.items():
        option = table.get(key)
        if option is None:
            if not empty(value):
                problems.append(f"{key}={value!r} is an option polymod does not know (a newer version's?); "
                                "polymod reads only options it understands, so it refuses rather than ignore it")
        elif not option.allows(value):
            problems.append(f"{key}={value!r}: {option.refusal}")
    if problems:
        listed = "\n  ".join(problems)
        raise FormatError(f"this {what} uses {len(problems)} option(s) polymod does not reproduce:\n  {listed}")


def status_of(option: Option) -> str:
    """One line for a docs table: the option's status and its note or refusal."""
    if option.status == "refused":
        return f"refused unless {option.default!r}: {option.refusal}"
    if option.status == "exact" and option.accepts is not None:
        return f"exact: {option.note}; other values refused: {option.refusal}"
    return f"{option.status}: {option.note}"


def table_rows(table: Mapping[str, Option]) -> list[tuple[str, str]]:
    """``(key, status line)`` per option, for generated documentation and reports."""
    return [(key, status_of(option)) for key, option in table.items()]


def refused(default: Any, why: str) -> Option:
    """An option polymod accepts only at ``default``."""
    return Option(default, "refused", refusal=why)


def inert(default: Any, note: str) -> Option:
    """An option with no effect on the adapter's function."""
    return Option(default, "no effect", note=note)


def exact(default: Any, note: str, accepts: Callable[[Any], bool] | None = None, refusal: str = "") -> Option:
    """An option read into the polymod module (only values ``accepts`` allows, when given)."""
    return Option(default, "exact", note=note, refusal=refusal, accepts=accepts)
