"""polymod serve's memory: N modules registered on the hub, R resident, against the bare server.

Goal (issue 16): 1,000 registered modules with 32 resident cost at most the
resident modules' bytes + 10 % over the bare server. Registered means
published on the hub the server reads: a registered module costs the server
nothing until a request names it (then it is pulled, loaded and attached).

Each configuration runs in its own fresh process (so that one's freed memory
does not hide the next one's): the server over SmolLM2-135M's architecture
(random weights, as in ``serve_load.py``) on loopback; ``/v1/models`` is
listed once (every registered module's metadata is read) and one short
request names each resident module in turn (each is pulled, loaded and
attached; eight requests at a time, so that batches mix modules and the
stacked factors are built). The resident set size is read after that.

* ``bare``: no module named;
* ``resident``: R LoRAs (r=8 on every linear layer of every block) resident;
* ``registered``: the same R resident, with N more published on the hub.

Run: ``python benchmarks/serve_memory.py [--registered 1000] [--resident 32]``;
writes ``benchmarks/results/serve_memory.json``. Publishing N modules takes
a while the first time; ``--work DIR`` keeps the hub for the next run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def publish_registered(host: torch.nn.Module, hub: Path, n: int) -> None:
    """N more modules on the hub (``bench/reg<i>@1.0.0``): LoRA r=8 on q/v, random, never named by a request."""
    import polymod as pm

    model = pm.Modular(host)
    for i in range(n):
        try:
            pm.hub.show(f"bench/reg{i}@1.0.0", hub=str(hub))
            continue
        except pm.hub.NotFoundError:
            pass
        model.add("x", pm.LoRA(rank=8, sites="attn.q|attn.v"))
        pm.hub.push(pm.save(model.remove("x"), hub.parent / "pkg-reg" / f"reg{i}"), f"bench/reg{i}@1.0.0",
                    hub=str(hub))
    model.detach()


def probe(work: Path, resident: int) -> dict[str, float]:
    """One configuration in this process: serve, list the models, name each resident module once; RSS after."""
    import httpx
    from serve_load import IdTokenizer, publish_modules, rss_mib, smollm2_host

    import polymod as pm
    from polymod.serving.engine import Engine, ServeOptions
    from polymod.serving.tour import running

    torch.set_num_threads(1)
    host = smollm2_host()
    refs = publish_modules(host, work / "hub", resident) if resident else []
    engine = Engine(host, IdTokenizer(), pm.hub.connect(str(work / "hub")), "host",
                    ServeOptions(max_batch=8, max_resident=max(resident, 1), max_cpu_modules=max(resident, 1),
                                 cache_dir=tempfile.mkdtemp(prefix="serve-mem-")))
    before = rss_mib()
    with running(engine) as url:
        listed = len(httpx.get(url + "/v1/models", timeout=600).json()["data"])
        def ask(ref: str) -> None:
            body = {"model": ref, "prompt": list(range(100, 164)), "max_tokens": 4, "temperature": 0}
            httpx.post(url + "/v1/completions", json=body, timeout=900).raise_for_status()

        with ThreadPoolExecutor(8) as pool:  # 8 at a time: batches of different modules (stacked factors built)
            list(pool.map(ask, refs or ["host"] * 8))
        stats = engine.cache.stats()
    weights = sum(p.numel() * p.element_size() for n in engine.model.names() for p in engine.model[n].parameters())
    return {"rss_mib": rss_mib(), "rss_before_mib": before, "listed": listed, "resident": stats["resident"],
            "resident_weights_mib": weights / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registered", type=int, default=1000, help="modules published but never requested")
    parser.add_argument("--resident", type=int, default=32, help="modules named by requests (made resident)")
    parser.add_argument("--work", default=None, help="directory of the hub (reused between runs)")
    parser.add_argument("--probe", choices=["bare", "resident", "registered"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-memory-"))
    if args.probe:  # a child process: one configuration
        sys.path.insert(0, str(Path(__file__).parent))
        out = probe(work if args.probe != "bare" else work / "bare", 0 if args.probe == "bare" else args.resident)
        print(json.dumps(out))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_load import publish_modules, smollm2_host

    rows: dict[str, dict] = {}
    for name in ("bare", "resident", "registered"):
        if name == "registered":
            start = time.perf_counter()
            host = smollm2_host()
            publish_modules(host, work / "hub", args.resident)
            publish_registered(host, work / "hub", args.registered)
            print(f"published {args.registered} registered modules in {time.perf_counter() - start:.0f} s")
        cmd = [sys.executable, __file__, "--probe", name, "--resident", str(args.resident), "--work", str(work)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, rows[name])
    bare = rows["bare"]["rss_mib"]
    weights = rows["resident"]["resident_weights_mib"]
    print("\n| server | modules listed | resident | RSS MiB | over bare MiB | × resident weights |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        over = r["rss_mib"] - bare
        print(f"| {name} | {r['listed'] - 1} | {r['resident']} | {r['rss_mib']:.0f} | {over:.0f} | "
              f"{over / weights if weights else float('nan'):.2f} |")
    print(f"resident weights: {weights:.0f} MiB; goal: 'registered' over bare ≤ {1.1 * weights:.0f} MiB (1.1×)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_memory.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
