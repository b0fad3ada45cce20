"""The module hub: package format, local store, HTTP server and client, web pages.

``pm.hub.push/pull/load/search/show/versions/lineage/yank/login`` work against
a local store (a directory, no server needed) or a remote hub URL with the
same API. See docs/hub.md for the package format, the server API and the CLI.
"""

import sys

from polymod import errors
from polymod.errors import (
    AuthError,
    ConflictError,
    DestinationError,
    ForbiddenError,
    HubError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
    TooLargeError,
)
from polymod.format import load, save
from polymod.hub.api import get, lineage, login, pull, push, search, show, versions, yank
from polymod.hub.client import LocalHub, connect
from polymod.hub.derived import DerivedInfo, DerivedStore
from polymod.hub.library import Library, library
from polymod.hub.store import Store, VersionInfo

__all__ = ["AuthError", "ConflictError", "DerivedInfo", "DerivedStore", "DestinationError", "ForbiddenError",
           "HubError", "IntegrityError", "InvalidNameError", "Library", "LocalHub", "NotFoundError", "Store",
           "TooLargeError", "VersionInfo", "connect", "get", "library", "lineage", "load", "login", "pull", "push",
           "save", "search", "show", "versions", "yank"]

# The hub's errors joined polymod's one hierarchy in polymod.errors (0.2); `from polymod.hub.errors import ...`
# was documented, so that path keeps working as an alias of the module that now holds them.
sys.modules.setdefault("polymod.hub.errors", errors)
