"""``polymod hub …``: the hub's command line (a Typer sub-app mounted by :mod:`polymod.cli`).

Every command is a short call into :mod:`polymod.hub`. ``--hub`` takes a URL
or a store directory and defaults to ``$POLYMOD_HUB``, else the local store at
``$POLYMOD_HOME/hub``. Transfers show progress bars on stderr; results go to
stdout (``--json`` for machine-readable output).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from polymod import hub as pmhub
from polymod.hub.auth import create_token, grant, revoke_token, revoke_user_tokens
from polymod.hub.server import serve as run

app = typer.Typer(help="Publish, find, version and pull modules: a local store or a hub server.",
                  no_args_is_help=True)
user_app = typer.Typer(help="Manage a hub's users and tokens (run on the hub's machine, against its store).",
                       no_args_is_help=True)
app.add_typer(user_app, name="user")

HubOpt = Annotated[str | None, typer.Option("--hub", help="hub URL or store directory "
                                               "(default: $POLYMOD_HUB, else $POLYMOD_HOME/hub)")]
# One name for "which hub" in every subcommand: --hub. Commands that run on the hub's own machine need its
# store directory; --store is kept as the older spelling.
StoreOpt = Annotated[Path | None, typer.Option("--hub", "--store", help="the hub's store directory (default: "
                                                  "$POLYMOD_HOME/hub; --store is an alias)")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="token for a remote hub (default: $POLYMOD_TOKEN "
                                                 "when $POLYMOD_HUB names this hub, else the one saved by "
                                                 "`polymod hub login` for it)")]
DbOpt = Annotated[str | None, typer.Option("--db", help="where the store's metadata lives: a postgresql:// URL "
                                             "(default: $POLYMOD_HUB_DB, else the database the store was created "
                                             "with, else its index.sqlite)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` with control characters (ANSI escapes, carriage returns, ...) shown as ``\\xNN``, never obeyed.

    What a hub sends (names, descriptions, error details) is printed through this: a hostile hub cannot
    move the cursor, recolour, retitle or rewrite the user's terminal.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def out(text: object) -> None:
    """Print one line of output to stdout, made :func:`terminal_safe`."""
    print(terminal_safe(str(text)))


def _dump(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))  # JSON escapes control characters itself


@app.command()
def serve(store: StoreOpt = None, db: DbOpt = None,
          host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="TCP port")] = 8000,
          max_upload_mb: Annotated[int, typer.Option(help="largest file accepted, in MiB")] = 2048) -> None:
    """Run the hub server (API under /api/v1, web pages under /, schema at /docs)."""

    s = pmhub.Store(store, db=db)
    out(f"polymod hub on http://{host}:{port} (store {s.root}, metadata {s.db.describe()})")
    run(s, host=host, port=port, max_upload_bytes=max_upload_mb << 20)


@app.command()
def login(url: Annotated[str, typer.Argument(help="the hub's URL, e.g. http://127.0.0.1:8000")],
          token: Annotated[str, typer.Option("--token", help="your token (from the hub's admin)", prompt=True,
                                             hide_input=True)]) -> None:
    """Check a token against a hub and save it for later commands."""
    out(f"logged in to {url} as {pmhub.login(url, token)}")


@app.command()
def push(path: Annotated[Path, typer.Argument(help="package directory written by pm.save")],
         ref: Annotated[str, typer.Argument(help="owner/name or owner/name@version")],
         version: Annotated[str | None, typer.Option(help="version, if REF has none")] = None,
         hub: HubOpt = None, token: TokenOpt = None) -> None:
    """Publish a module package."""
    info = pmhub.push(path, ref, version, hub=hub, token=token, progress=True)
    out(f"published {info.ref} sha256:{info.sha256}")


@app.command()
def pull(ref: Annotated[str, typer.Argument(help="owner/name[@version] (default latest)")],
         dest: Annotated[Path | None, typer.Option(help="directory to write the package to: new, empty, or "
                                                        "a previous pull of the same module")] = None,
         force: Annotated[bool, typer.Option("--force", help="write into a non-empty DEST that is not a previous "
                                             "pull (only the package's own files are replaced)")] = False,
         hub: HubOpt = None, token: TokenOpt = None) -> None:
    """Download a package, verifying every file's sha256; prints its directory. Never deletes your files."""
    out(pmhub.pull(ref, dest, hub=hub, token=token, progress=True, force=force))


@app.command()
def search(query: Annotated[str, typer.Argument(help="free text")] = "",
           kind: Annotated[str | None, typer.Option(help="module kind, e.g. lora")] = None,
           architecture: Annotated[str | None, typer.Option(help="host architecture")] = None,
           task: Annotated[str | None, typer.Option(help="task")] = None,
           language: Annotated[str | None, typer.Option(help="language")] = None,
           tag: Annotated[str | None, typer.Option(help="tag")] = None,
           owner: Annotated[str | None, typer.Option(help="owner")] = None,
           limit: Annotated[int, typer.Option(help="at most this many hits (1-100)")] = 20,
           offset: Annotated[int, typer.Option(help="skip this many hits (the next page's offset is printed)")] = 0,
           hub: HubOpt = None, as_json: JsonOpt = False) -> None:
    """Search modules by text and facets, a page at a time."""
    result = pmhub.search(query, hub=hub, limit=limit, offset=offset, owner=owner, kind=kind,
                          architecture=architecture, task=task, language=language, tag=tag)
    if as_json:
        return _dump(result.to_dict())
    partial = result.hits and len(result.hits) < result.total
    shown = f", {offset + 1}-{offset + len(result.hits)} shown" if partial else ""
    out(f"{result.total} module(s){shown}")
    for h in result.hits:
        out(f"{h['owner']}/{h['name']}@{h['version']}  {h['kind']}  {h['task'] or ''}  {h['description'] or ''}")
    if result.next_offset is not None:
        out(f"more: --offset {result.next_offset}")


@app.command()
def show(ref: Annotated[str, typer.Argument(help="owner/name[@version]")], hub: HubOpt = None,
         as_json: JsonOpt = False) -> None:
    """Show a version's card and files."""
    info = pmhub.show(ref, hub=hub)
    if as_json:
        return _dump(info.to_dict())
    card = info.card
    out(f"{info.ref}{'  [yanked: ' + (info.yank_reason or '') + ']' if info.yanked else ''}")
    out(f"kind {info.kind} · host {card.get('host', {}).get('architecture')} · {len(card.get('sites', []))} sites"
        f" · {info.downloads} download(s)")
    for key in ("task", "language", "license", "description"):
        if card.get(key):
            out(f"{key}: {card[key]}")
    if card.get("tags"):
        out("tags: " + ", ".join(card["tags"]))
    for key, value in card.get("metrics", {}).items():
        out(f"metric {key}: {value}")
    for path, meta in info.files.items():
        out(f"file {path}  {meta['size']:,} bytes  sha256:{meta['sha256']}")


@app.command()
def versions(ref: Annotated[str, typer.Argument(help="owner/name")], hub: HubOpt = None) -> None:
    """List a module's versions, newest first."""
    for v in pmhub.versions(ref, hub=hub):
        out(f"{v.version}{'  yanked' if v.yanked else ''}")


@app.command()
def lineage(ref: Annotated[str, typer.Argument(help="owner/name[@version]")],
            depth: Annotated[int, typer.Option(help="generations up and down")] = 8,
            hub: HubOpt = None, as_json: JsonOpt = False) -> None:
    """Show a version's ancestors and descendants."""
    graph = pmhub.lineage(ref, hub=hub, depth=depth)
    if as_json:
        return _dump(graph)
    for n in graph["nodes"]:
        out(f"{n['role']:<10} {n['id']}{'' if n.get('in_hub', True) else '  (not in this hub)'}")
    for e in graph["edges"]:
        weight = f"  weight {e['weight']}" if e.get("weight") is not None else ""
        out(f"edge {e['parent']} -> {e['child']}{weight}")


@app.command()
def yank(ref: Annotated[str, typer.Argument(help="owner/name@version")],
         reason: Annotated[str, typer.Option(help="why (shown to users)")] = "",
         undo: Annotated[bool, typer.Option(help="restore a yanked version")] = False,
         hub: HubOpt = None, token: TokenOpt = None) -> None:
    """Yank a version (hidden from latest and search; still pullable by exact version)."""
    info = pmhub.yank(ref, reason, hub=hub, token=token, undo=undo)
    out(f"{info.ref} {'yanked' if info.yanked else 'restored'}")


@app.command()
def check(store: StoreOpt = None, db: DbOpt = None) -> None:
    """Verify a store: every blob present and matching its sha256; exits 1 on problems."""
    problems = pmhub.Store(store, db=db).check()
    for p in problems:
        out(p)
    out("store is consistent" if not problems else f"{len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@app.command()
def gc(store: StoreOpt = None, db: DbOpt = None,
       older_than_hours: Annotated[float, typer.Option(help="keep unreferenced blobs younger than this "
                                                       "(uploads of pushes in progress)")] = 1.0) -> None:
    """Remove blobs no version refers to (and stale unfinished uploads); prints how many."""
    s = pmhub.Store(store, db=db)
    blobs, uploads = s.gc(older_than_hours * 3600), s.sweep_tmp(older_than_hours * 3600)
    out(f"removed {blobs} unreferenced blob(s) and {uploads} unfinished upload(s)")


@user_app.command("add")
def user_add(name: Annotated[str, typer.Argument(help="user name (also their namespace)")], store: StoreOpt = None,
             db: DbOpt = None,
             expires_days: Annotated[float | None, typer.Option(help="token lifetime in days")] = None,
             label: Annotated[str, typer.Option(help="a note about the token")] = "") -> None:
    """Create a user (if needed) and print a new token for them (shown once)."""

    expires = expires_days * 86400 if expires_days is not None else None
    out(create_token(pmhub.Store(store, db=db), name, expires_in=expires, label=label))


@user_app.command("grant")
def user_grant(namespace: Annotated[str, typer.Argument(help="namespace, e.g. an organisation")],
               name: Annotated[str, typer.Argument(help="user")], store: StoreOpt = None,
               db: DbOpt = None) -> None:
    """Let a user publish in another namespace."""

    grant(pmhub.Store(store, db=db), namespace, name)
    out(f"{name} may publish in {namespace}")


@user_app.command("revoke")
def user_revoke(token: Annotated[str | None, typer.Argument(help="the token to revoke")] = None,
                user: Annotated[str | None, typer.Option("--user", help="revoke every token of this user "
                                                         "(when you do not hold the token)")] = None,
                store: StoreOpt = None, db: DbOpt = None) -> None:
    """Revoke a token, or all of a user's tokens; exits 1 when there is no such token or user."""
    if (token is None) == (user is None):
        out("give either a TOKEN or --user NAME")
        raise typer.Exit(2)
    if user is not None:
        out(f"revoked {revoke_user_tokens(pmhub.Store(store, db=db), user)} token(s) of {user}")
        return
    if not revoke_token(pmhub.Store(store, db=db), token):
        out("no such token")
        raise typer.Exit(1)
    out("revoked")
