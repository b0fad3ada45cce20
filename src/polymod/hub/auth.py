"""Users, namespaces and tokens.

A user owns the namespace with their name and may be made a member of other
namespaces (an organisation). Tokens are random 256-bit secrets shown once;
the store keeps only their sha256 (a fast hash suffices for secrets with this
much entropy), so a leaked index does not leak tokens. A token may expire and
may be revoked.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from polymod.errors import AuthError, ForbiddenError, NotFoundError
from polymod.hub import db, names
from polymod.hub.store import Store

TOKEN_PREFIX = "pmh_"


def token_hash(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def add_user(store: Store, user: str) -> None:
    """Create a user (idempotent); the user owns the namespace of the same name.

    Raises:
        InvalidNameError: ``user`` is not a valid owner name.
    """
    names.check_owner(user)
    conn = store.connect()
    try:
        with db.transaction(conn):
            conn.execute("INSERT INTO users VALUES (?, ?) ON CONFLICT DO NOTHING", (user, time.time()))
            conn.execute("INSERT INTO members VALUES (?, ?) ON CONFLICT DO NOTHING", (user, user))
    finally:
        conn.close()


def grant(store: Store, namespace: str, user: str) -> None:
    """Let ``user`` publish in ``namespace`` (e.g. an organisation).

    Raises:
        NotFoundError: no such user.
    """
    names.check_owner(namespace)
    conn = store.connect()
    try:
        with db.transaction(conn):
            if conn.execute("SELECT 1 FROM users WHERE name=?", (user,)).fetchone() is None:
                raise NotFoundError(f"no user {user!r}; create it with `polymod hub user add {user}`")
            conn.execute("INSERT INTO members VALUES (?, ?) ON CONFLICT DO NOTHING", (namespace, user))
    finally:
        conn.close()


def create_token(store: Store, user: str, expires_in: float | None = None, label: str = "") -> str:
    """Issue a new token for ``user`` (created if missing); returns the token, shown only now.

    Args:
        store: the store.
        user: the user.
        expires_in: seconds until the token expires (None: never).
        label: a note such as the machine it is for.
    """
    add_user(store, user)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = time.time() + expires_in if expires_in is not None else None
    conn = store.connect()
    try:
        with db.transaction(conn):
            conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, 0)",
                         (token_hash(token), user, label[:200], time.time(), expires))
    finally:
        conn.close()
    return token


def revoke_token(store: Store, token: str) -> bool:
    """Revoke a token; returns whether it existed."""
    conn = store.connect()
    try:
        with db.transaction(conn):
            cur = conn.execute("UPDATE tokens SET revoked=1 WHERE hash=?", (token_hash(token),))
        return cur.rowcount > 0
    finally:
        conn.close()


def revoke_user_tokens(store: Store, user: str) -> int:
    """Revoke every live token of ``user`` (an admin's way to cut off a token they do not hold).

    Returns:
        How many tokens were revoked.

    Raises:
        NotFoundError: no such user.
    """
    conn = store.connect()
    try:
        with db.transaction(conn):
            if conn.execute("SELECT 1 FROM users WHERE name=?", (user,)).fetchone() is None:
                raise NotFoundError(f"no user {user!r}; `polymod hub user add` creates users")
            cur = conn.execute("UPDATE tokens SET revoked=1 WHERE username=? AND revoked=0", (user,))
        return cur.rowcount
    finally:
        conn.close()


def authenticate(store: Store, token: str | None) -> str:
    """The user a token belongs to.

    Raises:
        AuthError: no token, an unknown or revoked one, or an expired one.
    """
    if not token:
        raise AuthError("this operation needs a token: run `polymod hub login URL --token TOKEN` "
                        "or pass token=...")
    conn = store.connect()
    try:
        row = conn.execute("SELECT * FROM tokens WHERE hash=?", (token_hash(token),)).fetchone()
    finally:
        conn.close()
    if row is None or row["revoked"]:
        raise AuthError("the token is not valid (unknown or revoked); ask the hub's admin for a new one")
    if row["expires"] is not None and row["expires"] < time.time():
        raise AuthError("the token has expired; ask the hub's admin for a new one")
    return row["username"]


def authorize(store: Store, user: str, namespace: str) -> None:
    """Check that ``user`` may publish in ``namespace``.

    Raises:
        ForbiddenError: the user is not a member of the namespace.
    """
    conn = store.connect()
    try:
        ok = conn.execute("SELECT 1 FROM members WHERE namespace=? AND username=?", (namespace, user)).fetchone()
    finally:
        conn.close()
    if ok is None:
        raise ForbiddenError(f"user {user!r} may not publish in namespace {namespace!r}; push to {user}/<name> "
                             f"or ask the hub's admin to run `polymod hub user grant {namespace} {user}`")
