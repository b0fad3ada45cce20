"""The module hub: package format, local store, HTTP server and client, web pages.

``pm.hub.push/pull/load/search/show/versions/lineage/yank/login`` work against
a local store (a directory, no server needed) or a remote hub URL with the
same API. See docs/hub.md for the package format, the server API and the CLI.
"""

from polymod.format import load, save
from polymod.hub.api import get, lineage, login, pull, push, search, show, versions, yank
from polymod.hub.client import LocalHub, connect
from polymod.hub.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    HubError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
    TooLargeError,
)
from polymod.hub.store import Store, VersionInfo

__all__ = ["AuthError", "ConflictError", "ForbiddenError", "HubError", "IntegrityError", "InvalidNameError",
           "LocalHub", "NotFoundError", "Store", "TooLargeError", "VersionInfo", "connect", "get", "lineage", "load",
           "login", "pull", "push", "save", "search", "show", "versions", "yank"]
