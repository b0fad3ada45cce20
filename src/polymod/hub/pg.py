"""The hub's PostgreSQL backend (psycopg 3; ``pip install 'polymod[pg]'``).

Selected by a ``postgresql://`` URL: ``polymod hub serve --hub DIR --db postgresql://hub@db:5432/polymod`` or
``$POLYMOD_HUB_DB``. The tables are those of :data:`polymod.hub.db.SCHEMA` with 64-bit integers and
double-precision timestamps; the store's SQL runs unchanged (``?`` placeholders become psycopg's ``%s``).

Guarantees, the same as SQLite's:

* **Atomic publish**: a version and its files, tags, lineage and search entry are one transaction.
* **Serialised writers**: every write transaction starts by taking one transaction-level advisory lock
  (:data:`WRITE_LOCK`), so writes from any number of threads, processes or hub servers happen one after the other
  exactly as under SQLite's single writer — the "does this version exist?" check and the insert cannot interleave
  with another publisher's. A writer that cannot get the lock within the busy timeout gets
  :class:`~polymod.errors.BusyError` (the server answers 503 with ``Retry-After``). ``UNIQUE (owner, name,
  version)`` holds in the table as well.
* **Readers never wait**: reads run outside transactions (autocommit, MVCC) and see the last committed state.

Full-text search: a ``tsvector`` per version in table ``search`` with a GIN index. Text is split into tokens the
way SQLite's ``unicode61`` tokenizer does (case-folded, diacritics removed, split at anything not a letter or
digit) before it reaches PostgreSQL — no stemming, no stop words, no language dictionary — and a query word
matches a token it is a prefix of, so both backends find the same versions for the same query.

Connections are pooled per URL (idle ones kept, at most :data:`MAX_IDLE`).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from polymod.errors import BusyError, ConfigError
from polymod.hub.db import SEARCH_FIELDS, Database, redact

WRITE_LOCK = 0x706F6C796D6F64  # "polymod": the advisory lock every write transaction holds
MAX_IDLE = 16
MAX_POSITIONS = 256  # PostgreSQL keeps at most 256 positions of one lexeme
MAX_LEXEME = 500  # characters; PostgreSQL refuses lexemes over 2047 bytes


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise ConfigError("the hub's PostgreSQL backend needs psycopg 3: pip install 'polymod[pg]' "
                          "(or 'psycopg[binary]')") from None
    return psycopg


class Row(tuple):
    """A result row addressable by position and by column name (like :class:`sqlite3.Row`)."""

    def __new__(cls, values: Any, index: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return tuple.__getitem__(self, self._index[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        """The column names."""
        return list(self._index)


def _row_factory(cursor: Any) -> Any:
    index = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: Row(values, index)


@lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """``?`` → ``%s`` (and a literal ``%`` → ``%%``); the hub's SQL has no ``?`` inside string literals."""
    return sql.replace("%", "%%").replace("?", "%s")


def tokens(text: str) -> list[str]:
    """The search tokens of ``text``: case-folded, without diacritics, split at non-alphanumerics."""
    text = unicodedata.normalize("NFKD", text.casefold())
    return [t[:MAX_LEXEME] for t in re.findall(r"[^\W_]+", "".join(c for c in text if not unicodedata.combining(c)))]


def tsvector(fields: list[str]) -> str:
    """A ``tsvector`` literal of the fields' tokens with positions (a gap between fields, so no phrase spans two)."""
    positions: dict[str, list[int]] = {}
    pos = 1
    for field in fields:
        for token in tokens(field):
            if pos <= 16383 and len(positions.setdefault(token, [])) < MAX_POSITIONS:
                positions[token].append(pos)
            pos += 1
        pos += 2
    return " ".join(f"'{t}':{','.join(map(str, p))}" if p else f"'{t}'" for t, p in positions.items())


def tsquery(words: list[str]) -> str:
    """A ``tsquery``: every word must match; a word of several tokens (``my_mod``) is a phrase; the last token of
    each word is a prefix (SQLite's ``"word"*``)."""
    parts = []
    for word in words:
        toks = tokens(word)
        if toks:
            parts.append(" <-> ".join(f"'{t}'" for t in toks[:-1]) + (" <-> " if len(toks) > 1 else "")
                         + f"'{toks[-1]}':*")
    return " & ".join(f"({p})" for p in parts)


class _Pool:
    def __init__(self, url: str):
        self.url, self.idle, self.lock = url, [], threading.Lock()

    def get(self, fresh: bool = False) -> Any:
        if fresh:  # one pooled connection was found dead: the idle others most likely are too
            self.close()
        with self.lock:
            while self.idle:
                raw = self.idle.pop()
                if not raw.closed:
                    return raw
        psycopg = _psycopg()
        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=_row_factory, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise BusyError(f"cannot connect to the hub database {redact(self.url)}: {_reason(exc)}; check the URL and "
                            "that PostgreSQL is running and reachable, then retry") from None

    def put(self, raw: Any) -> None:
        psycopg = _psycopg()
        if raw.closed or raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raw.close()
            return
        with self.lock:
            if len(self.idle) < MAX_IDLE:
                self.idle.append(raw)
                return
        raw.close()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for raw in idle:
            raw.close()


_POOLS: dict[str, _Pool] = {}
_POOLS_LOCK = threading.Lock()


def close_pools() -> None:
    """Close every idle pooled connection (e.g. before dropping a database)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    for pool in pools:
        pool.close()


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class _Entered:
    """Exits an already entered context manager at the end of a ``with`` block."""

    def __init__(self, manager: Any):
        self.manager = manager

    def __enter__(self) -> Any:
        return self.manager

    def __exit__(self, *exc: Any) -> Any:
        return self.manager.__exit__(*exc)


class Connection:
    """A pooled psycopg connection with the store's interface: ``execute`` with ``?`` placeholders, rows by name,
    :meth:`transaction` holding the global write lock; :meth:`close` returns it to the pool."""

    def __init__(self, pool: _Pool, busy_timeout: float):
        self.pool, self.busy_timeout = pool, busy_timeout
        self.raw, self.in_transaction = pool.get(), False

    def execute(self, sql: str, params: Any = ()) -> Any:
        """Run one statement; returns a cursor (``fetchone``, ``fetchall``, iteration, ``rowcount``).

        Outside a transaction, a statement that finds its connection closed by the server (PostgreSQL restarted,
        or ended the session) runs once more on a new connection.

        Raises:
            BusyError: the database cannot be reached.
        """
        psycopg = _psycopg()
        try:
            return self.raw.execute(_placeholders(sql), params)
        except psycopg.OperationalError as exc:
            if not self.raw.closed or self.in_transaction:
                raise
            self.raw = self.pool.get(fresh=True)
            try:
                return self.raw.execute(_placeholders(sql), params)
            except psycopg.OperationalError:
                if not self.raw.closed:
                    raise
                raise BusyError(f"the hub database {redact(self.pool.url)} is unavailable ({_reason(exc)}); "
                                "retry in a moment") from None

    def executemany(self, sql: str, rows: Any) -> None:
        """Run one statement for each parameter tuple in ``rows``."""
        with self.raw.cursor() as cur:
            cur.executemany(_placeholders(sql), list(rows))

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction serialised with every other writer (see the module docstring).

        Raises:
            BusyError: the write lock was not free within ``busy_timeout`` seconds.
        """
        psycopg = _psycopg()
        try:
            if self.raw.closed:
                self.raw = self.pool.get(fresh=True)
            tx = self.raw.transaction()
            tx.__enter__()
        except psycopg.OperationalError as exc:  # a connection the server closed: the client retries
            raise BusyError(f"the hub database {redact(self.pool.url)} is unavailable ({_reason(exc)}); "
                            "retry in a moment") from None
        self.in_transaction = True
        try:
            with _Entered(tx):
                self.raw.execute(f"SET LOCAL lock_timeout = {max(1, int(self.busy_timeout * 1000))}")
                try:
                    self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                except psycopg.errors.LockNotAvailable:
                    raise BusyError("the hub's database is busy with other writes; retry in a moment") from None
                yield self
        finally:
            self.in_transaction = False

    def close(self) -> None:
        """Give the connection back to the pool (idempotent)."""
        if self.raw is not None:
            self.pool.put(self.raw)
            self.raw = None


class PostgresDatabase(Database):
    """A hub store's metadata in PostgreSQL.

    Args:
        url: ``postgresql://user[:password]@host[:port]/database[?options]``.
    """

    backend = "postgresql"
    types = {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "int": "BIGINT",
             "float": "DOUBLE PRECISION"}

    def __init__(self, url: str):
        _psycopg()
        self.url = url
        with _POOLS_LOCK:
            self.pool = _POOLS.setdefault(url, _Pool(url))

    def describe(self) -> str:
        return redact(self.url)

    def connect(self, busy_timeout: float = 60.0) -> Connection:
        return Connection(self.pool, busy_timeout)

    def close(self) -> None:
        self.pool.close()

    def table_exists(self, conn: Any, table: str) -> bool:
        return conn.execute("SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = ?",
                            (table,)).fetchone() is not None

    def search_schema(self) -> list[str]:
        return ["CREATE TABLE search (version_id BIGINT PRIMARY KEY REFERENCES versions(id), doc TSVECTOR NOT NULL)",
                "CREATE INDEX search_doc ON search USING GIN (doc)"]

    def index_search(self, conn: Any, version_id: int, fields: dict[str, str]) -> None:
        conn.execute("INSERT INTO search (version_id, doc) VALUES (?, ?::tsvector)",
                     (version_id, tsvector([fields[k] for k in SEARCH_FIELDS])))

    def unindex_search(self, conn: Any, version_id: int) -> None:
        conn.execute("DELETE FROM search WHERE version_id = ?", (version_id,))

    def text_search(self, words: list[str]) -> tuple[str, str, list[Any], str]:
        query = tsquery(words)
        if not query:
            return "latest l", "1=0", [], "l.version_id"
        return ("search JOIN latest l ON l.version_id = search.version_id CROSS JOIN (SELECT ?::tsquery AS q) "
                "AS text_query", "search.doc @@ text_query.q", [query], "search.version_id DESC")

    def integrity_problems(self, conn: Any) -> list[str]:
        missing = conn.execute("SELECT COUNT(*) FROM latest l WHERE NOT EXISTS "
                               "(SELECT 1 FROM search s WHERE s.version_id = l.version_id)").fetchone()[0]
        return [f"{missing} modules missing from the full-text index"] if missing else []
