"""Helpers for the hub tests: module packages on tiny hosts, and hub servers on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

import polymod as pm
from tests.hosts import make_host, randomize

_HOSTS: dict[str, torch.nn.Module] = {}


def host(family: str = "bert") -> torch.nn.Module:
    """A cached tiny host (never mutated by the hub tests)."""
    if family not in _HOSTS:
        _HOSTS[family] = make_host(family)
    return _HOSTS[family]


def make_package(path: Path, family: str = "bert", seed: int = 0, rank: int = 2, **card) -> Path:
    """Save a LoRA module with random weights (seeded) on a tiny host as a package at ``path``."""
    model = pm.Modular(host(family))
    try:
        model.add("m", pm.LoRA(rank=rank))
        torch.manual_seed(seed)
        randomize(model["m"])
        for key, value in card.items():
            setattr(model["m"].card, key, value)
        return pm.save(model["m"], path)
    finally:
        model.detach()  # the cached host is restored exactly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def hub_thread(store, **kw):
    """A hub server in a thread on 127.0.0.1 (free port); yields its URL and stops it on exit."""
    import uvicorn

    from polymod.hub.server import create_app

    app = create_app(store, **kw)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        thread.start()
        deadline = time.time() + 20
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("hub server did not start")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.lock.release()


def start_hub_process(store: Path, port: int, max_upload_mb: int = 64) -> subprocess.Popen:
    """``polymod hub serve`` in a child process on 127.0.0.1; returns once it answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", "from polymod.cli import main; main()", "hub", "serve",
                             "--store", str(store), "--port", str(port), "--max-upload-mb", str(max_upload_mb)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("hub process did not start")
