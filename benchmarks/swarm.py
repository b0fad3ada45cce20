"""Remote modules on loopback: latency per call by rows, decode speed with remote sites, a host killed mid-run.

Host: SmolLM2-135M's geometry with random weights (Llama, hidden 576, 30 layers, 9 heads / 3 KV
heads, intermediate 1536, vocab 49152: the same decode work as the real model), fp32. Modules:
LoRA r=8 on ``q_proj``. Every host is a separate supervised process tree (``HostProcess``) on
127.0.0.1; the client is this process.

1. **Latency per call by rows**: one remote call of a 576 → 576 LoRA site with 1, 16, 256 and 4096
   rows (fp32), p50 / p99 over ``--calls`` calls, against the same function run locally.
2. **Decode tokens/s** (batch 1, greedy, ``--tokens`` new tokens): the bare host; a LoRA at 1 and at
   4 sites run locally; the same modules run remotely (``run="remote"``). The overhead per remote
   site call is (remote step time − local step time) / sites.
3. **A host killed mid-run**: three hosts serve modules a, b, c (4 sites each), mixed with static
   weights; ``--runs`` generations run back to back and host c's process tree is killed after the
   first third. Reported: failed generations (the goal is 0), tokens/s before and after, and what the
   report says was dropped.

Run: ``python benchmarks/swarm.py [--calls 50 --tokens 16 --runs 6]`` (needs the ``swarm`` extra);
writes ``benchmarks/results/swarm.json``. Loopback has no network latency: add your network's round
trip per remote site call (per routed layer, per decoding step) to read these numbers for a WAN.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_hosts import llama_host

import polymod as pm
from polymod.swarm.process import HostConfig, HostProcess

RESULTS = Path(__file__).parent / "results"
SMOLLM2 = {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536, "vocab": 49152}


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0–1) of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(client: pm.swarm.Swarm, info: dict, module: pm.Module, calls: int) -> list[dict]:
    """p50/p99 of one remote call by rows, with the local call for comparison."""
    site = next(iter(module.sites))
    part = module.part(site)
    rows_out = []
    for rows in (1, 16, 256, 4096):
        x = torch.randn(rows, module.sites[site].in_features)
        for _ in range(3):  # warm the connection and the server's pools
            client.call(info["peer_id"], info["uids"][0], [x], 30).result(31)
        remote, local = [], []
        for _ in range(calls):
            t = time.perf_counter()
            client.call(info["peer_id"], info["uids"][0], [x], 30).result(31)
            remote.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                part(x, None)
            local.append(time.perf_counter() - t)
        row = {"rows": rows, "payload_kB": round(x.numel() * 4 / 1e3, 1),
               "remote_p50_ms": 1e3 * statistics.median(remote), "remote_p99_ms": 1e3 * pct(remote, 0.99),
               "local_p50_ms": 1e3 * statistics.median(local)}
        print(f"  {rows:5d} rows {row['payload_kB']:8.1f} kB  remote p50 {row['remote_p50_ms']:7.2f} ms  "
              f"p99 {row['remote_p99_ms']:7.2f} ms  local {row['local_p50_ms']:.3f} ms", flush=True)
        rows_out.append(row)
    return rows_out


def decode(host: torch.nn.Module, tokens: int, prompt: torch.Tensor) -> float:
    """Greedy decode of ``tokens`` new tokens; returns seconds."""
    t = time.perf_counter()
    with torch.no_grad():
        out = host.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                            min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + tokens
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="remote calls per row count")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per generation")
    parser.add_argument("--runs", type=int, default=6, help="generations in the kill test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    host = llama_host(**SMOLLM2)
    model = pm.Modular(host)
    sites = {1: "model.layers.0.self_attn.q_proj",
             4: "model.layers.[0-3].self_attn.q_proj"}
    for name, pattern, std in [("one", sites[1], 0.02), ("a", sites[4], 0.02), ("b", sites[4], 0.03),
                               ("c", sites[4], 0.04)]:
        model.add(name, pm.LoRA(rank=8, sites=pattern))
        with torch.no_grad():
            for _, part in model[name].items():
                part.B.normal_(std=std)
        pm.save(model[name], root / name)
    procs: dict[str, HostProcess] = {}
    result: dict = {"machine": platform.platform(), "threads": torch.get_num_threads(), "args": vars(args)}
    client = None
    try:
        t = time.perf_counter()
        for name in ("one", "a", "b", "c"):
            dht = procs["one"].info["addresses"] if procs else []
            procs[name] = HostProcess(HostConfig(source=str(root / name), name=f"bench/{name}", dht=dht),
                                      log=root / f"{name}.log")
            procs[name].start(timeout=180)
        result["start_4_hosts_s"] = time.perf_counter() - t
        client = pm.swarm.join(procs["one"].info["addresses"])
        print(f"4 hosts ready in {result['start_4_hosts_s']:.1f} s; latency per call (576-wide rows, fp32):")
        result["latency"] = latency(client, procs["one"].info, model["one"], args.calls)

        for name in ("one", "a", "b", "c"):
            model.add(f"r{name}", pm.Remote(f"bench/{name}", dht=client, run="remote", timeout=10,
                                            owner=procs[name].info["owner"]))
        prompt = torch.randint(3, SMOLLM2["vocab"], (1, 8), generator=torch.Generator().manual_seed(0))
        rows = []
        for label, expr, remote_sites in [("bare host", None, 0), ("LoRA at 1 site, local", "one", 0),
                                          ("LoRA at 1 site, remote", "rone", 1), ("LoRA at 4 sites, local", "a", 0),
                                          ("LoRA at 4 sites, remote", "ra", 4)]:
            model.use(expr)
            decode(host, 4, prompt)  # warm-up
            seconds = statistics.median(decode(host, args.tokens, prompt) for _ in range(3))
            rows.append({"contender": label, "tokens_per_s": args.tokens / seconds,
                         "ms_per_token": 1e3 * seconds / args.tokens, "remote_sites": remote_sites})
            print(f"  {label:26s} {args.tokens / seconds:7.2f} tok/s  {1e3 * seconds / args.tokens:7.1f} ms/token",
                  flush=True)
        by = {r["contender"]: r["ms_per_token"] for r in rows}
        for n in (1, 4):
            local = by[f"LoRA at {n} site{'s' if n > 1 else ''}, local"]
            remote = by[f"LoRA at {n} site{'s' if n > 1 else ''}, remote"]
            rows.append({"contender": f"overhead per remote site call ({n} site(s))",
                         "ms_per_site_call": (remote - local) / n})
            print(f"  overhead per remote site call with {n} site(s): {(remote - local) / n:.2f} ms")
        result["decode"] = rows
        pm.swarm.report(model)  # reset the call logs

        model.use(pm.Mix(["ra", "rb", "rc"], router=pm.Static([0.4, 0.3, 0.3])))
        kill_after = max(1, args.runs // 3)
        failed, times = 0, []
        for run in range(args.runs):
            if run == kill_after:
                procs["c"].kill()
            try:
                times.append(decode(host, args.tokens, prompt))
            except Exception as exc:  # a failed generation: the goal is none
                failed += 1
                print(f"  run {run}: failed: {type(exc).__name__}: {exc}")
        report = pm.swarm.report(model)
        before = [args.tokens / s for s in times[:kill_after]]
        after = [args.tokens / s for s in times[kill_after:]]
        result["kill"] = {"runs": args.runs, "killed_after_run": kill_after, "failed_generations": failed,
                          "tokens_per_s_before": statistics.median(before) if before else None,
                          "tokens_per_s_after": statistics.median(after) if after else None,
                          "dropped_calls_c": len(report["rc"]["dropped"]),
                          "first_drop_reason": report["rc"]["dropped"][0]["reason"][:80]
                          if report["rc"]["dropped"] else None,
                          "answered_a": sum(report["ra"]["answered"].values())}
        kill = result["kill"]
        print(f"  kill: {failed} failed generations of {args.runs}; tok/s before {kill['tokens_per_s_before']:.2f}, "
              f"after {kill['tokens_per_s_after']:.2f}; c dropped {kill['dropped_calls_c']} calls "
              f"({kill['first_drop_reason']})")
    finally:
        if client is not None:
            client.shutdown()
        for proc in procs.values():
            proc.stop(grace=5)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "swarm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'swarm.json'}")


if __name__ == "__main__":
    main()
