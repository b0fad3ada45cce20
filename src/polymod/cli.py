"""The ``polymod`` command line: a thin Typer layer over the library.

Each command is one short function calling the library. Failures exit non-zero
with a one-line message, never a traceback (:func:`main` catches
:class:`~polymod.errors.PolymodError`).
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

import polymod
from polymod.errors import PolymodError
from polymod.hub.commands import app as _hub_app
from polymod.merging.recipe import merge_command
from polymod.training.run_config import run_file

app = typer.Typer(name="polymod", help="Modular deep learning: modules, routing, merging and a module hub.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)


@app.command()
def version() -> None:
    """Print polymod's version."""
    print(polymod.__version__)


@app.command()
def kinds() -> None:
    """List the registered module kinds."""
    for kind in polymod.registered_kinds():
        print(kind)


@app.command()
def merge(
    recipe: str = typer.Argument(..., help="Recipe YAML: models, base_model, merge_method, parameters, dtype."),
    out: str = typer.Argument(..., help="Output directory for the merged checkpoint (sharded safetensors)."),
    seed: int = typer.Option(0, help="Seed of DARE's random masks."),
    shard_size: str = typer.Option("2GB", help="Largest output shard, e.g. 500MB or 2GB."),
    quiet: bool = typer.Option(False, "--quiet", help="Hide the progress bar."),
) -> None:
    """Merge whole safetensors checkpoints by a mergekit-style recipe, tensor by tensor."""
    print(merge_command(recipe, out, seed=seed, shard_size=shard_size, progress=not quiet))


@app.command()
def train(
    config: str = typer.Argument(..., help="Training config YAML: host, modules, train, data or tasks, training."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output_dir."),
    check: bool = typer.Option(False, "--check", help="Only validate the config (every problem is listed)."),
) -> None:
    """Train modules on a frozen host from a YAML config (data parallel under torchrun)."""
    print(json.dumps(run_file(config, resume=resume, check_only=check), indent=2, sort_keys=True))


# sub-apps are mounted after the root commands, so `polymod --help` lists the root commands first
app.add_typer(_hub_app, name="hub")


def main() -> None:
    """Entry point: run the app, turning polymod errors into a message and exit code 1."""
    try:
        app(standalone_mode=False)
    except PolymodError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: unknown command, missing argument, bad option value
        console.print(f"[red]error:[/red] {exc.format_message()} (see `polymod --help`)")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
