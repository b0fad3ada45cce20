"""``polymod hub …``: the hub's command line (a Typer sub-app mounted by :mod:`polymod.cli`).

Every command is a short call into :mod:`polymod.hub`. ``--hub`` takes a URL
or a store directory and defaults to ``$POLYMOD_HUB``, else the local store at
``$POLYMOD_HOME/hub``. Transfers show progress bars on stderr; results go to
stdout (``--json`` for machine-readable output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from polymod import hub as pmhub
from polymod.hub.auth import create_token, grant, revoke_token
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
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


def _dump(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


@app.command()
def serve(store: StoreOpt = None,
          host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="TCP port")] = 8000,
          max_upload_mb: Annotated[int, typer.Option(help="largest file accepted, in MiB")] = 2048) -> None:
    """Run the hub server (API under /api/v1, web pages under /, schema at /docs)."""

    print(f"polymod hub on http://{host}:{port} (store {store or pmhub.Store().root})")
    run(store if store is not None else pmhub.Store(), host=host, port=port, max_upload_bytes=max_upload_mb << 20)


@app.command()
def login(url: Annotated[str, typer.Argument(help="the hub's URL, e.g. http://127.0.0.1:8000")],
          token: Annotated[str, typer.Option("--token", help="your token (from the hub's admin)", prompt=True,
                                             hide_input=True)]) -> None:
    """Check a token against a hub and save it for later commands."""
    print(f"logged in to {url} as {pmhub.login(url, token)}")


@app.command()
def push(path: Annotated[Path, typer.Argument(help="package directory written by pm.save")],
         ref: Annotated[str, typer.Argument(help="owner/name or owner/name@version")],
         version: Annotated[str | None, typer.Option(help="version, if REF has none")] = None,
         hub: HubOpt = None, token: TokenOpt = None) -> None:
    """Publish a module package."""
    info = pmhub.push(path, ref, version, hub=hub, token=token, progress=True)
    print(f"published {info.ref} sha256:{info.sha256}")


@app.command()
def pull(ref: Annotated[str, typer.Argument(help="owner/name[@version] (default latest)")],
         dest: Annotated[Path | None, typer.Option(help="directory to write the package to: new, empty, or "
                                                        "a previous pull of the same module")] = None,
         force: Annotated[bool, typer.Option("--force", help="write into a non-empty DEST that is not a previous "
                                             "pull (only the package's own files are replaced)")] = False,
         hub: HubOpt = None, token: TokenOpt = None) -> None:
    """Download a package, verifying every file's sha256; prints its directory. Never deletes your files."""
    print(pmhub.pull(ref, dest, hub=hub, token=token, progress=True, force=force))


@app.command()
def search(query: Annotated[str, typer.Argument(help="free text")] = "",
           kind: Annotated[str | None, typer.Option(help="module kind, e.g. lora")] = None,
           architecture: Annotated[str | None, typer.Option(help="host architecture")] = None,
           task: Annotated[str | None, typer.Option(help="task")] = None,
           language: Annotated[str | None, typer.Option(help="language")] = None,
           tag: Annotated[str | None, typer.Option(help="tag")] = None,
           owner: Annotated[str | None, typer.Option(help="owner")] = None,
           limit: Annotated[int, typer.Option(help="at most this many hits")] = 20,
           hub: HubOpt = None, as_json: JsonOpt = False) -> None:
    """Search modules by text and facets."""
    result = pmhub.search(query, hub=hub, limit=limit, owner=owner, kind=kind, architecture=architecture,
                          task=task, language=language, tag=tag)
    if as_json:
        return _dump(result.to_dict())
    print(f"{result.total} module(s)")
    for h in result.hits:
        print(f"{h['owner']}/{h['name']}@{h['version']}  {h['kind']}  {h['task'] or ''}  {h['description'] or ''}")


@app.command()
def show(ref: Annotated[str, typer.Argument(help="owner/name[@version]")], hub: HubOpt = None,
         as_json: JsonOpt = False) -> None:
    """Show a version's card and files."""
    info = pmhub.show(ref, hub=hub)
    if as_json:
        return _dump(info.to_dict())
    card = info.card
    print(f"{info.ref}{'  [yanked: ' + (info.yank_reason or '') + ']' if info.yanked else ''}")
    print(f"kind {info.kind} · host {card.get('host', {}).get('architecture')} · {len(card.get('sites', []))} sites")
    for key in ("task", "language", "license", "description"):
        if card.get(key):
            print(f"{key}: {card[key]}")
    if card.get("tags"):
        print("tags: " + ", ".join(card["tags"]))
    for key, value in card.get("metrics", {}).items():
        print(f"metric {key}: {value}")
    for path, meta in info.files.items():
        print(f"file {path}  {meta['size']:,} bytes  sha256:{meta['sha256']}")


@app.command()
def versions(ref: Annotated[str, typer.Argument(help="owner/name")], hub: HubOpt = None) -> None:
    """List a module's versions, newest first."""
    for v in pmhub.versions(ref, hub=hub):
        print(f"{v.version}{'  yanked' if v.yanked else ''}")


@app.command()
def lineage(ref: Annotated[str, typer.Argument(help="owner/name[@version]")],
            depth: Annotated[int, typer.Option(help="generations up and down")] = 8,
            hub: HubOpt = None, as_json: JsonOpt = False) -> None:
    """Show a version's ancestors and descendants."""
    graph = pmhub.lineage(ref, hub=hub, depth=depth)
    if as_json:
        return _dump(graph)
    for n in graph["nodes"]:
        print(f"{n['role']:<10} {n['id']}{'' if n.get('in_hub', True) else '  (not in this hub)'}")
    for e in graph["edges"]:
        weight = f"  weight {e['weight']}" if e.get("weight") is not None else ""
        print(f"edge {e['parent']} -> {e['child']}{weight}")


@app.command()
def yank(ref: Annotated[str, typer.Argument(help="owner/name@version")],
         reason: Annotated[str, typer.Option(help="why (shown to users)")] = "",
         undo: Annotated[bool, typer.Option(help="restore a yanked version")] = False,
         hub: HubOpt = None, token: TokenOpt = None) -> None:
    """Yank a version (hidden from latest and search; still pullable by exact version)."""
    info = pmhub.yank(ref, reason, hub=hub, token=token, undo=undo)
    print(f"{info.ref} {'yanked' if info.yanked else 'restored'}")


@app.command()
def check(store: StoreOpt = None) -> None:
    """Verify a store: every blob present and matching its sha256; exits 1 on problems."""
    problems = pmhub.Store(store).check()
    for p in problems:
        print(p)
    print("store is consistent" if not problems else f"{len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@user_app.command("add")
def user_add(name: Annotated[str, typer.Argument(help="user name (also their namespace)")], store: StoreOpt = None,
             expires_days: Annotated[float | None, typer.Option(help="token lifetime in days")] = None,
             label: Annotated[str, typer.Option(help="a note about the token")] = "") -> None:
    """Create a user (if needed) and print a new token for them (shown once)."""

    expires = expires_days * 86400 if expires_days is not None else None
    print(create_token(pmhub.Store(store), name, expires_in=expires, label=label))


@user_app.command("grant")
def user_grant(namespace: Annotated[str, typer.Argument(help="namespace, e.g. an organisation")],
               name: Annotated[str, typer.Argument(help="user")], store: StoreOpt = None) -> None:
    """Let a user publish in another namespace."""

    grant(pmhub.Store(store), namespace, name)
    print(f"{name} may publish in {namespace}")


@user_app.command("revoke")
def user_revoke(token: Annotated[str, typer.Argument(help="the token to revoke")], store: StoreOpt = None) -> None:
    """Revoke a token; exits 1 when the store has no such token."""
    if not revoke_token(pmhub.Store(store), token):
        print("no such token")
        raise typer.Exit(1)
    print("revoked")
