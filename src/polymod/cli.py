"""The ``polymod`` command line: a thin Typer layer over the library.

Each command is one short function calling the library. Failures exit non-zero
with a one-line message, never a traceback (:func:`main` catches
:class:`~polymod.errors.PolymodError`).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

import polymod
from polymod.errors import ConfigError, PolymodError
from polymod.hub.commands import app as _hub_app
from polymod.hub.commands import terminal_safe
from polymod.merging.recipe import merge_command
from polymod.serving.engine import ServeOptions, load_engine
from polymod.serving.server import serve as run_server
from polymod.serving.vllm_engine import serve_vllm
from polymod.swarm.commands import app as _swarm_app
from polymod.swarm.commands import host as _host_command
from polymod.training.plot import plot_run
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
    """Train modules on a frozen host from a YAML config (data parallel under torchrun).

    Progress goes to stderr: a bar on a terminal, else a plain log line every 10 s; a final line gives the
    steps, time and last training loss. The JSON summary goes to stdout.
    """
    if not logging.getLogger().handlers:  # a library user's own logging set-up wins
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_file(config, resume=resume, check_only=check), indent=2, sort_keys=True))


@app.command()
def plot(
    run_dir: str = typer.Argument(..., help="A run's output_dir (with metrics.jsonl), or the metrics.jsonl file."),
    out: str = typer.Option(None, "--out", help="PNG to write (default: metrics.png next to metrics.jsonl)."),
) -> None:
    """Draw a run's training loss and evaluation curves from metrics.jsonl to a PNG."""
    print(plot_run(run_dir, out))


@app.command()
def serve(
    host_model: str = typer.Argument(..., help="Directory of the host causal LM (config, weights, tokenizer)."),
    hub: str = typer.Option(None, "--hub", help="Hub URL or store directory the modules come from "
                            "(default: $POLYMOD_HUB, else $POLYMOD_HOME/hub)."),
    bind: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, help="TCP port."),
    max_batch: int = typer.Option(8, help="Rows decoded together at most (continuous batching)."),
    max_queue: int = typer.Option(64, help="Rows waiting at most; beyond, requests get 429 with Retry-After."),
    prefill_chunk: int = typer.Option(64, help="Prompt tokens prefilled per step while rows decode (chunked "
                                      "prefill; 0: whole prompts at once, running rows wait)."),
    max_resident: int = typer.Option(8, help="Modules attached to the host at most (LRU, pinnable)."),
    max_cpu_modules: int = typer.Option(64, help="Loaded modules kept in memory at most (LRU)."),
    alias: Annotated[list[str] | None, typer.Option(help="NAME=owner/name@version: a model name clients may "
                                                     "use (repeatable).")] = None,
    name: str = typer.Option(None, help="The model id of the bare host (default: the directory's name)."),
    api_keys: bool = typer.Option(False, "--api-keys", help="Require 'Authorization: Bearer <hub token>'."),
    cors_origin: Annotated[list[str] | None, typer.Option(help="Allow browser requests from this origin "
                                                           "(repeatable; CORS is off otherwise).")] = None,
    max_body_kb: int = typer.Option(1024, help="Largest request body accepted, in KiB."),
    cache_dir: str = typer.Option(None, help="Disk tier of the module cache (default: a temporary directory)."),
    allow_host_mismatch: bool = typer.Option(False, help="Serve modules made on other weights of the same shapes."),
    engine: str = typer.Option("native", help="Engine: native (any module kind, per-row compositions) or vllm "
                               "(LoRA only, vLLM's server; see docs/serving.md)."),
    max_lora_rank: int = typer.Option(16, help="vllm engine: vLLM's --max-lora-rank (larger modules: truncated SVD)."),
    dtype: str = typer.Option("float32", help="Host dtype: float32, bfloat16 or float16."),
) -> None:
    """Serve a host and the hub's modules through an OpenAI-compatible API (/v1/completions, /v1/chat/...)."""
    if engine not in ("native", "vllm"):
        raise ConfigError(f"--engine takes native or vllm, got {engine!r}")
    alias, cors_origin = alias or [], cors_origin or []
    bad = [a for a in alias if "=" not in a]
    if bad:
        raise ConfigError(f"--alias takes NAME=owner/name[@version], got {bad[0]!r}")
    options = ServeOptions(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                           max_resident=max_resident,
                           max_cpu_modules=max_cpu_modules, api_keys=api_keys, cors_origins=cors_origin,
                           max_body_bytes=max_body_kb << 10, cache_dir=cache_dir,
                           allow_host_mismatch=allow_host_mismatch, aliases=dict(a.split("=", 1) for a in alias))
    if engine == "vllm":
        raise typer.Exit(serve_vllm(host_model, hub, options, name=name, dtype=dtype, bind=bind, port=port,
                                    max_rank=max_lora_rank))
    served = load_engine(host_model, hub, options, name=name, dtype=dtype)
    console.print(f"polymod serve: {served.host_id} on http://{bind}:{port}/v1 (modules from {served.hub!r})")
    run_server(served, host=bind, port=port)


app.command("host")(_host_command)

# sub-apps are mounted after the root commands, so `polymod --help` lists the root commands first
app.add_typer(_hub_app, name="hub")
app.add_typer(_swarm_app, name="swarm")


def main() -> None:
    """Entry point: run the app; the process exits with the command's code (0 on success, non-zero on failure).

    Polymod errors and OS errors become a one-line message and exit code 1; usage errors exit 2
    with click's message. With ``standalone_mode=False`` click returns (not raises) the code a command
    ends with (``raise typer.Exit(1)``), so it is passed on here.
    """
    try:
        code = app(standalone_mode=False)
    except PolymodError as exc:
        console.print(f"[red]error:[/red] {escape(terminal_safe(str(exc)))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: unknown command, missing argument, bad option value
        console.print(f"[red]error:[/red] {escape(exc.format_message())} (see `polymod --help`)", highlight=False,
                      soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        console.print(f"[red]error:[/red] {escape(terminal_safe(str(exc)))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


if __name__ == "__main__":
    main()
