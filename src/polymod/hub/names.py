"""Names on the hub: owners, module names, semantic versions and references.

A module is addressed as ``owner/name@version``. Every part is checked
against a small, strict grammar before it touches a path, a query or a URL, so
path traversal (``..``, ``/``), control characters and absurd lengths are
rejected with a clear message:

* **owner**: 1–39 lowercase letters, digits and inner hyphens (``alice``, ``nlp-lab``);
* **name**: 1–100 letters, digits, ``_``, ``-`` and inner dots, starting with a letter or
  digit, never containing ``..`` (``sentiment``, ``lora.en-de``);
* **version**: a Semantic Versioning 2.0 version without build metadata
  (``1.0.0``, ``2.1.0-rc.1``), at most 64 characters, or ``latest`` in references.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from polymod.errors import InvalidNameError

__all__ = ["InvalidNameError", "Ref", "SemVer", "check_owner", "check_name", "check_version", "LATEST"]

OWNER_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,37}[a-z0-9])?")
NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,98}[A-Za-z0-9_-])?")
_NUM = r"(?:0|[1-9][0-9]{0,9})"
_PRE_ID = r"(?:0|[1-9][0-9]{0,9}|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
SEMVER_RE = re.compile(rf"({_NUM})\.({_NUM})\.({_NUM})(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?")
MAX_VERSION_LEN = 64
LATEST = "latest"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_owner(owner: object) -> str:
    """Validate an owner (namespace) name and return it.

    Raises:
        InvalidNameError: not 1–39 lowercase letters, digits and inner hyphens.
    """
    if not isinstance(owner, str) or not OWNER_RE.fullmatch(owner):
        raise InvalidNameError(f"owner {_shown(owner)} is invalid; expected 1-39 lowercase letters, digits and inner "
                         "hyphens, e.g. 'alice' or 'nlp-lab'")
    return owner


def check_name(name: object) -> str:
    """Validate a module name and return it.

    Raises:
        InvalidNameError: bad characters, ``..``, or more than 100 characters.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(f"module name {_shown(name)} is invalid; expected 1-100 letters, digits, '_', '-' and "
                         "inner dots (no '..', no '/'), e.g. 'sentiment' or 'lora.en-de'")
    return name


def check_version(version: object, allow_latest: bool = False) -> str:
    """Validate a semantic version (or ``latest`` when allowed) and return it.

    Raises:
        InvalidNameError: not a SemVer 2.0 ``MAJOR.MINOR.PATCH[-PRERELEASE]`` of at most 64 characters.
    """
    if allow_latest and version == LATEST:
        return LATEST
    if not isinstance(version, str) or len(version) > MAX_VERSION_LEN or not SEMVER_RE.fullmatch(version):
        extra = " or 'latest'" if allow_latest else ""
        raise InvalidNameError(f"version {_shown(version)} is invalid; expected a semantic version MAJOR.MINOR.PATCH "
                         f"such as '1.0.0' or '2.1.0-rc.1' (no build metadata, at most 64 characters){extra}")
    return version


@total_ordering
@dataclass(frozen=True)
class SemVer:
    """A parsed semantic version, ordered by SemVer 2.0 precedence."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[int | str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SemVer:
        """Parse ``MAJOR.MINOR.PATCH[-PRERELEASE]``.

        Raises:
            InvalidNameError: not a valid version.
        """
        m = SEMVER_RE.fullmatch(check_version(text))
        assert m is not None  # check_version guarantees the match
        pre = tuple(int(p) if p.isdigit() else p for p in m.group(4).split(".")) if m.group(4) else ()
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre)

    def _key(self) -> tuple:
        # A release sorts after its pre-releases; numeric identifiers sort before alphanumeric ones.
        pre = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 1 if not pre else 0, pre)

    def __lt__(self, other: SemVer) -> bool:
        return self._key() < other._key()

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return core + ("-" + ".".join(str(p) for p in self.prerelease) if self.prerelease else "")


@dataclass(frozen=True)
class Ref:
    """A reference ``owner/name[@version]``; ``version`` is ``latest`` when omitted."""

    owner: str
    name: str
    version: str = LATEST

    @classmethod
    def parse(cls, text: object, default_version: str | None = None) -> Ref:
        """Parse and validate ``owner/name[@version]``.

        Args:
            text: the reference.
            default_version: the version when ``text`` has none (default ``latest``).

        Raises:
            InvalidNameError: malformed reference or invalid part.
        """
        path, _, version = text.partition("@") if isinstance(text, str) else ("", "", "")
        if not isinstance(text, str) or len(text) > 256 or path.count("/") != 1 or "/" in version:
            raise InvalidNameError(f"module reference {_shown(text)} is invalid; expected 'owner/name' or "
                                   "'owner/name@version', e.g. 'alice/sentiment@1.0.0'")
        owner, name = path.split("/")
        version = version or default_version or LATEST
        return cls(check_owner(owner), check_name(name), check_version(version, allow_latest=True))

    @property
    def module(self) -> str:
        """``owner/name`` without the version."""
        return f"{self.owner}/{self.name}"

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}@{self.version}"

