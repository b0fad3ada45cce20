"""polymod serve under closed-loop load: throughput and latency with M modules, the bare host, and naive PEFT.

Host: SmolLM2-135M-Instruct's architecture (Llama, 30 layers, hidden 576, 9
heads / 3 KV heads, intermediate 1536, vocab 49,152, tied embeddings) built
from its config with **random weights** (the compute per token is the real
model's; no download). Modules: M LoRAs, r=8, on every linear layer of every
block (q/k/v/o/gate/up/down), published to a local hub and made resident before
timing. Load: C concurrent streaming clients in a closed loop (each sends its
next request when the last ends), each request naming one of the M modules at
random, 64 random prompt tokens, 64 generated tokens (no EOS), greedy.

Contenders, one run each, in one process:

* ``bare``: the same server, ``model`` = the host (no module);
* ``M=1, 8, 32``: the server with M LoRAs;
* ``naive``: PEFT with the M=32 LoRAs, one request at a time, ``set_adapter``
  then ``generate`` (in process, no HTTP: the overhead favours it).

Reported: generated tokens/s, time to first token (p50/p99), inter-token
latency (p50/p99), resident set size after the run, module cache hit rate.
The machine's other load changes every figure: compare ratios from one run.

Run: ``python benchmarks/serve_load.py [--duration 15] [--clients 8]``; writes
``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import transformers as tf
import uvicorn
from peft import PeftModel

import polymod as pm
from polymod.interop import write_peft
from polymod.serving.engine import Engine, ServeOptions
from polymod.serving.server import create_app

RESULTS = Path(__file__).parent / "results"
SITES = "*_proj"  # q, k, v, o, gate, up, down in every block


class IdTokenizer:
    """Decodes token ids as their numbers: the benchmark sends token ids and counts chunks."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def smollm2_host(seed: int = 0) -> torch.nn.Module:
    """SmolLM2-135M's architecture with random weights, fp32, no EOS (every request runs its 64 tokens)."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=None,
                         eos_token_id=None)
    host = tf.LlamaForCausalLM(cfg).eval()
    host.generation_config.eos_token_id = None
    return host


def publish_modules(host: torch.nn.Module, hub: Path, m: int) -> list[str]:
    """M random LoRAs (r=8, every linear layer of every block) published as ``bench/lora<i>@1.0.0``."""
    model, refs = pm.Modular(host), []
    for i in range(m):
        ref = f"bench/lora{i}@1.0.0"
        try:
            pm.hub.show(ref, hub=str(hub))
        except pm.hub.NotFoundError:
            model.add("x", pm.LoRA(rank=8, sites=SITES))
            torch.manual_seed(100 + i)
            with torch.no_grad():
                for p in model["x"].parameters():
                    p.normal_(0, 0.02)
            pm.hub.push(pm.save(model.remove("x"), hub.parent / "pkg" / f"lora{i}"), ref, hub=str(hub))
        refs.append(ref)
    model.detach()
    return refs


def rss_mib() -> float:
    """Resident set size of this process now, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _client(url: str, models: list[str], prompts: list[list[int]], gen: int, stop_at: float,
                  out: dict, rng: random.Random, extra: dict | None = None) -> None:
    """One closed-loop streaming client until ``stop_at``: time to first token, inter-token gaps, tokens.

    ``extra``: more request-body fields (the vLLM comparison uses this script's client too).
    """
    async with httpx.AsyncClient(timeout=300) as http:
        while time.perf_counter() < stop_at:
            body = {"model": rng.choice(models), "prompt": rng.choice(prompts), "max_tokens": gen, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
            start, last, tokens = time.perf_counter(), None, 0
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["text"]:
                        (out["ttft"] if last is None else out["itl"]).append(now - (start if last is None else last))
                        last = now
            out["tokens"].append(tokens)
            out["done"].append(time.perf_counter())


def run_server(host, hub: Path, refs: list[str], clients: int, duration: float, prompt: int, gen: int,
               seed: int, prefill_chunk: int = 64) -> dict[str, float]:
    """One closed-loop run against a fresh server over ``host``; ``refs`` empty means the bare host."""
    engine = Engine(host, IdTokenizer(), pm.hub.connect(str(hub)), "host",
                    ServeOptions(max_batch=clients, max_queue=4 * clients, max_resident=max(len(refs), 1),
                                 prefill_chunk=prefill_chunk,
                                 cache_dir=tempfile.mkdtemp(prefix="serve-bench-")))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        for ref in refs:  # resident before timing
            httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": ref}, timeout=300).raise_for_status()
        rng = random.Random(seed)
        prompts = [[rng.randrange(100, 49000) for _ in range(prompt)] for _ in range(64)]
        out: dict[str, list[float]] = {"ttft": [], "itl": [], "tokens": [], "done": []}
        hits0 = dict(engine.metrics.cache)
        start = time.perf_counter()
        stop_at = start + duration

        async def load():
            await asyncio.gather(*(_client(url, refs or ["host"], prompts, gen, stop_at, out, random.Random(seed + i))
                                   for i in range(clients)))

        asyncio.run(load())
        elapsed = max(out["done"]) - start
        hits = {k: v - hits0.get(k, 0) for k, v in engine.metrics.cache.items()}
        looked = hits.get(("hit", "resident"), 0) + hits.get(("miss", "resident"), 0)
        return {"tokens_per_s": sum(out["tokens"]) / elapsed, "requests": len(out["tokens"]),
                **_percentiles("ttft", out["ttft"]), **_percentiles("itl", out["itl"]), "rss_mib": rss_mib(),
                "cache_hit_rate": hits.get(("hit", "resident"), 0) / looked if looked else float("nan"),
                "peak_batch": engine.metrics.peak_batch}
    finally:
        server.should_exit = True
        thread.join(30)
        for name in list(engine.model.names()):
            engine.model.remove(name)
        engine.model.detach()


def run_naive(host, hub: Path, refs: list[str], duration: float, prompt: int, gen: int, seed: int) -> dict:
    """PEFT, one request at a time: ``set_adapter`` then ``generate``."""
    rng = random.Random(seed)
    peft_model = None
    for i, ref in enumerate(refs):
        path = write_peft(pm.hub.get(ref, hub=str(hub)), Path(tempfile.mkdtemp()) / f"a{i}")
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(host, path, adapter_name=f"a{i}")
        else:
            peft_model.load_adapter(path, adapter_name=f"a{i}")
    itl, tokens = [], 0
    start = time.perf_counter()
    while time.perf_counter() < start + duration:
        peft_model.set_adapter(f"a{rng.randrange(len(refs))}")
        ids = torch.tensor([[rng.randrange(100, 49000) for _ in range(prompt)]])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen,
                                      min_new_tokens=gen, do_sample=False)
        spent = time.perf_counter() - t0
        n = out.shape[1] - prompt
        tokens += n
        itl.append(spent / n)
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": tokens / elapsed, "requests": len(itl), **_percentiles("itl", itl),
            "ttft_p50": float("nan"), "ttft_p99": float("nan"), "rss_mib": rss_mib(), "cache_hit_rate": float("nan"),
            "peak_batch": 1}


def _percentiles(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {f"{name}_p50": float("nan"), f"{name}_p99": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {f"{name}_p50": statistics.median(values), f"{name}_p99": q[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per contender")
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--modules", default="1,8,32", help="values of M")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine two "
                        "threads spin-wait on each other; a decoding step took 8.5 s instead of 0.40 s)")
    parser.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens prefilled per step while rows "
                        "decode (0: whole prompts at once, the running rows stall)")
    parser.add_argument("--no-naive", action="store_true", help="skip the PEFT one-at-a-time baseline")
    parser.add_argument("--work", default=None, help="directory for the hub of benchmark modules (reused)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ms = [int(m) for m in args.modules.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-load-"))
    host = smollm2_host()
    t0 = time.perf_counter()
    refs = publish_modules(host, work / "hub", max(ms))
    print(f"published {len(refs)} modules in {time.perf_counter() - t0:.0f} s")
    rows: dict[str, dict] = {"bare": run_server(host, work / "hub", [], args.clients, args.duration, args.prompt,
                                                args.gen, 0, args.prefill_chunk)}
    print("bare", rows["bare"])
    for m in ms:
        rows[f"M={m}"] = run_server(host, work / "hub", refs[:m], args.clients, args.duration, args.prompt,
                                    args.gen, m, args.prefill_chunk)
        print(f"M={m}", rows[f"M={m}"])
    if not args.no_naive:
        rows[f"naive M={max(ms)}"] = run_naive(host, work / "hub", refs[:max(ms)], args.duration, args.prompt,
                                               args.gen, 1)
    bare = rows["bare"]["tokens_per_s"]
    print("\n| contender | tokens/s | × bare | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | RSS MiB | hit rate | "
          "peak batch |\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / bare:.2f} | {r['ttft_p50']:.2f} / "
              f"{r['ttft_p99']:.2f} | {1000 * r['itl_p50']:.0f} / {1000 * r['itl_p99']:.0f} | {r['rss_mib']:.0f} | "
              f"{r['cache_hit_rate']:.2f} | {r['peak_batch']} |")
    RESULTS.mkdir(exist_ok=True)
    out = {"args": vars(args), "machine": platform.platform(), "torch": torch.__version__, "rows": rows}
    (RESULTS / "serve_load.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
