"""A throwaway PostgreSQL server for the hub tests: ``initdb`` + ``pg_ctl`` in a temporary directory.

One cluster per test session, listening on 127.0.0.1 only (no Unix socket) on a free port, trust authentication,
durability off (fsync, synchronous commit, full-page writes: the data dies with the session anyway). Each test
gets a fresh database (``CREATE DATABASE``), dropped after it. PostgreSQL refuses to run as root, so as root the
server runs as the ``postgres`` (else ``nobody``) user.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.hub_helpers import free_port

USER = "polymod"


def binaries() -> tuple[str, str] | None:
    """``initdb`` and ``pg_ctl``: on $PATH, in /usr/local/bin, or in Debian's /usr/lib/postgresql/<v>/bin."""
    for folder in [None, "/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        initdb = shutil.which("initdb", path=folder)
        pg_ctl = shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    return None


def why_unavailable() -> str | None:
    """Why no throwaway cluster can be started here (None when it can)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed (pip install -e '.[pg]')"
    if binaries() is None:
        return "PostgreSQL's initdb/pg_ctl were not found (apt-get install postgresql)"
    if os.geteuid() == 0 and _server_user() is None:
        return "running as root and no 'postgres' or 'nobody' user to run PostgreSQL as"
    return None


def _server_user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    return None


class Cluster:
    """A running throwaway PostgreSQL server (see the module docstring)."""

    def __init__(self):
        self.initdb, self.pg_ctl = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="polymod-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.as_user: dict = {}
        if os.geteuid() == 0:
            user = _server_user()
            self.as_user = {"user": user.pw_uid, "group": user.pw_gid}
            os.chmod(self.root, 0o755)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run([self.initdb, "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C",
                   "--no-sync"])
        self.port, self._names = self._start(), itertools.count()

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **self.as_user)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {proc.stderr.strip()[-2000:]}")

    def _start(self) -> int:
        for _ in range(5):  # a free port can be taken before the server binds it: try another
            port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
            try:
                self._run([self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60",
                           "start"])
                return port
            except RuntimeError:
                time.sleep(0.2)
        raise RuntimeError(f"PostgreSQL did not start: {self.log.read_text()[-2000:] if self.log.exists() else ''}")

    def url(self, database: str = "postgres") -> str:
        """The URL of ``database`` on this server."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """Create an empty database; returns its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database at ``url`` (its open connections are ended)."""
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def stop(self) -> None:
        """Stop the server and delete its directory."""
        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
