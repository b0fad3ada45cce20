"""The hub under load: a store of 100,000 versions, 200 concurrent searchers and 20 pushers on loopback.

Setup: a synthetic store (``hub_seed.py``: generated once by a documented fast path, then reused)
served by ``polymod hub serve`` in a child process (one uvicorn process, as deployed) on 127.0.0.1.

Load, for ``--duration`` seconds:

* ``--searchers`` simulated users in one asyncio process (httpx): each searches (a Zipf-drawn word,
  two words, a facet filter alone or with a word, or nothing; 20% of searches ask for a later page),
  then opens the web module page of a hit with probability 0.5, then thinks for an exponentially
  distributed pause of mean ``--think`` seconds, and starts again;
* ``--pushers`` publishers in a second process (threads, the real client ``RemoteHub.push``): each
  pushes new versions of its own module back to back (upload + publish), retrying a 503 after its
  ``Retry-After``; a push that still fails counts as failed;
* a ``/health`` probe every 100 ms.

Reported: searches/s, p50/p99 latency of search, module page and ``/health``, push success rate and
pushes/s, versions lost (pushes answered 201 whose version is not in the store afterwards), the
server's peak RSS, and how busy the load generator was (its CPU use and event-loop lag, so a
saturated client is not mistaken for a slow server). Goals (issue 13): p99 search < 200 ms, module
page < 300 ms, ``/health`` < 100 ms, 0 failed pushes, 0 lost versions. The machine's other load
changes every figure: the script prints the load average next to them.

Run::

    python benchmarks/hub_load.py                  # 100k versions, 200 searchers, 20 pushers, 30 s
    python benchmarks/hub_load.py --quick          # 5k versions, 20 searchers, 4 pushers, 10 s

Results go to ``benchmarks/results/hub_load.json`` (``hub_load_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.hub_seed import KINDS, LANGUAGES, TAGS, TASKS, WORDS, _zipf, seed, throwaway_postgres  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) in milliseconds, or None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 1)


def start_server(store: Path, port: int, database: str | None) -> subprocess.Popen:
    """``polymod hub serve`` in a child process; returns once ``/health`` answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    db = ["--db", database] if database else []
    proc = subprocess.Popen([sys.executable, "-c", "from polymod.cli import main; main()", "hub", "serve",
                             "--store", str(store), "--port", str(port), *db], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the hub server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the hub server did not start within 120 s")


def rss_sampler(pid: int, peak: list[int], stop: threading.Event) -> None:
    """Keep the process's peak resident set size (bytes) in ``peak[0]``."""
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except OSError:
            return
        stop.wait(0.5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def baseline(url: str, n: int, seed_: int) -> dict[str, dict[str, float | None]]:
    """Latency of requests sent one at a time before the load (the server's own cost plus the machine's load)."""
    rng = random.Random(seed_)
    times: dict[str, list[float]] = {"search": [], "page": [], "health": []}
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            response = http.get("/api/v1/search", params=random_search(rng))
            if response.status_code != 200:
                raise SystemExit(f"search answered HTTP {response.status_code}: {response.text[:500]}")
            hits = response.json()["hits"]
            times["search"].append(time.perf_counter() - t0)
            if hits:
                hit = rng.choice(hits)
                t0 = time.perf_counter()
                http.get(f"/m/{hit['owner']}/{hit['name']}")
                times["page"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            http.get("/api/v1/health")
            times["health"].append(time.perf_counter() - t0)
    return {k: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for k, v in times.items()}


def make_package(path: Path) -> Path:
    """A real package (a LoRA on a tiny random BERT) for the pushers."""
    import torch
    import transformers as tf

    import polymod as pm

    torch.manual_seed(0)
    host = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=37, vocab_size=100))
    model = pm.Modular(host)
    model.add("m", pm.LoRA(rank=2, sites="*.query"))
    model["m"].card.description = "pushed under load"
    return pm.save(model["m"], path)


def pushers(url: str, tokens: dict[str, str], package: str, duration: float, out: mp.Queue) -> None:
    """Run one pusher thread per token for ``duration`` seconds; put the results on ``out``."""
    from polymod.errors import BusyError, PolymodError
    from polymod.hub.remote import RemoteHub

    results: list[dict] = []
    lock = threading.Lock()
    end = time.time() + duration

    def run(user: str, token: str) -> None:
        client = RemoteHub(url, token, cache=tempfile.mkdtemp(prefix="hubload-push-"), timeout=120)
        n = 0
        while time.time() < end:
            version, t0, error = f"1.0.{n}", time.perf_counter(), None
            for _attempt in range(20):
                try:
                    client.push(package, f"{user}/pushed@{version}")
                    error = None
                    break
                except BusyError as exc:  # 503 + Retry-After: the client waits and tries again
                    error = str(exc)
                    time.sleep(1.0)
                except PolymodError as exc:
                    error = str(exc)
                    break
            with lock:
                results.append({"user": user, "version": version, "ok": error is None, "error": error,
                                "seconds": time.perf_counter() - t0})
            n += 1

    threads = [threading.Thread(target=run, args=item) for item in tokens.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(results)


def random_search(rng: random.Random) -> dict[str, object]:
    """One search's query parameters, drawn like a user's."""
    kind = rng.random()
    if kind < 0.4:
        params: dict[str, object] = {"q": _zipf(rng, WORDS, 1)[0]}
    elif kind < 0.6:
        params = {"q": " ".join(_zipf(rng, WORDS, 2))}
    elif kind < 0.8:
        facet = rng.choice([("task", TASKS), ("language", LANGUAGES), ("kind", KINDS), ("tag", TAGS)])
        params = {facet[0]: rng.choice(facet[1])}
    elif kind < 0.9:
        params = {"q": _zipf(rng, WORDS, 1)[0], "task": rng.choice(TASKS)}
    else:
        params = {}
    if rng.random() < 0.2:
        params["offset"] = 20 * rng.randint(1, 5)
    return params


async def drive(url: str, searchers: int, duration: float, think: float, seed_: int) -> dict[str, object]:
    """Run the searchers, the /health probe and an event-loop lag monitor; return the samples."""
    samples: dict[str, list[float]] = {"search": [], "page": [], "health": [], "lag": []}
    errors: dict[str, int] = {"search": 0, "page": 0, "health": 0}
    limits = httpx.Limits(max_connections=searchers + 10, max_keepalive_connections=searchers + 10)
    end = time.monotonic() + duration
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def timed(kind: str, path: str, params: dict | None = None) -> httpx.Response | None:
            t0 = time.perf_counter()
            try:
                response = await http.get(path, params=params or None)
            except httpx.HTTPError:
                errors[kind] += 1
                return None
            samples[kind].append(time.perf_counter() - t0)
            if response.status_code != 200:
                errors[kind] += 1
                return None
            return response

        async def searcher(i: int) -> None:
            rng = random.Random(seed_ * 1000 + i)
            await asyncio.sleep(rng.random() * think)  # users arrive spread out, not all at once
            while time.monotonic() < end:
                response = await timed("search", "/api/v1/search", random_search(rng))
                hits = response.json()["hits"] if response is not None else []
                if hits and rng.random() < 0.5:
                    hit = rng.choice(hits)
                    await timed("page", f"/m/{hit['owner']}/{hit['name']}")
                await asyncio.sleep(rng.expovariate(1 / think))

        async def health() -> None:
            while time.monotonic() < end:
                await timed("health", "/api/v1/health")
                await asyncio.sleep(0.1)

        async def lag() -> None:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                await asyncio.sleep(0.05)
                samples["lag"].append(time.perf_counter() - t0 - 0.05)

        await asyncio.gather(*(searcher(i) for i in range(searchers)), health(), lag())
    return {"samples": samples, "errors": errors}


def lost_versions(url: str, pushed: list[dict]) -> int:
    """Pushes answered 201 whose version the hub does not list afterwards."""
    by_user: dict[str, set[str]] = {}
    for p in pushed:
        if p["ok"]:
            by_user.setdefault(p["user"], set()).add(p["version"])
    lost = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        for user, versions in by_user.items():
            listed: set[str] = set()
            while True:
                r = http.get(f"/api/v1/modules/{user}/pushed/versions", params={"offset": len(listed)})
                page = {v["version"] for v in r.json()} if r.status_code == 200 else set()
                if not page:
                    break
                listed |= page
            lost += len(versions - listed)
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, default=100_000)
    parser.add_argument("--searchers", type=int, default=200)
    parser.add_argument("--pushers", type=int, default=20)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--think", type=float, default=1.0, help="mean pause between a user's searches (s)")
    parser.add_argument("--store", type=Path, default=None, help="the seeded store (default under the temp dir)")
    parser.add_argument("--db", default=None, help="metadata database: 'postgresql' (a throwaway server on "
                        "loopback, seeded each run) or a postgresql:// URL; default SQLite in the store")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="5k versions, 20 searchers, 4 pushers, 10 s")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--baseline", type=int, default=30, help="requests sent one at a time before the load")
    args = parser.parse_args()
    if args.quick:  # smaller defaults; options given explicitly still win
        for key, value in {"versions": 5_000, "searchers": 20, "pushers": 4, "duration": 10.0}.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    cluster = None
    if args.db == "postgresql":
        cluster, args.db = throwaway_postgres()
        args.store = args.store or Path(tempfile.mkdtemp(prefix="polymod-hub-load-pg-"))
    store_dir = args.store or Path(tempfile.gettempdir()) / f"polymod-hub-load-{args.versions}"
    try:
        run(args, store_dir)
    finally:
        if cluster is not None:
            cluster.stop()


def run(args: argparse.Namespace, store_dir: Path) -> None:
    """Seed (or reuse) the store, serve it, drive the load, and report."""
    suffix = ("_quick" if args.quick else "") + ("_postgresql" if args.db else "")
    out_path = args.out or RESULTS / f"hub_load{suffix}.json"

    from polymod.hub.auth import create_token

    t0 = time.time()
    store = seed(store_dir, args.versions, database=args.db)
    seed_seconds = time.time() - t0
    run_id = f"{int(time.time())}"
    tokens = {f"pusher{run_id}x{i}": create_token(store, f"pusher{run_id}x{i}") for i in range(args.pushers)}
    package = make_package(Path(tempfile.mkdtemp(prefix="hubload-pkg-")) / "p")
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(store_dir, port, args.db)
    peak, stop = [0], threading.Event()
    threading.Thread(target=rss_sampler, args=(server.pid, peak, stop), daemon=True).start()
    load_before = os.getloadavg()
    try:
        alone = baseline(url, args.baseline, 1)
        server_cpu0 = cpu_seconds(server.pid)
        queue: mp.Queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=pushers, args=(url, tokens, str(package), args.duration, queue))
        proc.start()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        wall0 = time.perf_counter()
        driven = asyncio.run(drive(url, args.searchers, args.duration, args.think, 0))
        wall = time.perf_counter() - wall0
        server_cpu = cpu_seconds(server.pid) - server_cpu0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        pushed = queue.get(timeout=600) if args.pushers else []
        proc.join(timeout=60)
        lost = lost_versions(url, pushed)
    finally:
        stop.set()
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    load_after = os.getloadavg()
    s, e = driven["samples"], driven["errors"]
    ok = sum(p["ok"] for p in pushed)
    result = {
        "backend": store.db.backend, "versions": args.versions, "searchers": args.searchers, "pushers": args.pushers,
        "duration_s": args.duration,
        "think_s": args.think, "seed_s": round(seed_seconds, 1), "wall_s": round(wall, 1),
        "searches": len(s["search"]), "searches_per_s": round(len(s["search"]) / wall, 1),
        "pages": len(s["page"]), "health_probes": len(s["health"]),
        "search_ms": {"p50": percentile(s["search"], 50), "p99": percentile(s["search"], 99)},
        "page_ms": {"p50": percentile(s["page"], 50), "p99": percentile(s["page"], 99)},
        "health_ms": {"p50": percentile(s["health"], 50), "p99": percentile(s["health"], 99),
                      "max": percentile(s["health"], 100)},
        "errors": e, "pushes": len(pushed), "pushes_ok": ok, "pushes_failed": len(pushed) - ok,
        "push_errors": sorted({p["error"][:200] for p in pushed if p["error"]})[:5],
        "pushes_per_s": round(ok / wall, 2), "push_ms": {"p50": percentile([p["seconds"] for p in pushed], 50),
                                                           "p99": percentile([p["seconds"] for p in pushed], 99)},
        "lost_versions": lost, "server_peak_rss_mb": round(peak[0] / 2**20, 1),
        "server_cpu_share": round(server_cpu / wall, 2),
        "server_cpu_ms_per_request": round(1000 * server_cpu / max(1, len(s["search"]) + len(s["page"])
                                                                   + len(s["health"]) + 4 * len(pushed)), 2),
        "one_at_a_time_ms": alone,
        "client_cpu_share": round((cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall, 2),
        "client_loop_lag_ms": {"p50": percentile(s["lag"], 50), "p99": percentile(s["lag"], 99)},
        "goals": {"search_p99_ms": 200, "page_p99_ms": 300, "health_p99_ms": 100},
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(), "python": platform.python_version(), "command": " ".join(sys.argv),
    }
    print_table(result)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


def print_table(r: dict) -> None:
    """The run's figures as a plain table."""
    def goal(value, limit):
        return "" if value is None else f"  (goal < {limit}: {'met' if value < limit else 'NOT met'})"

    print(f"\n{r['backend']} · {r['versions']:,} versions · {r['searchers']} searchers · {r['pushers']} pushers · "
          f"{r['wall_s']} s · load avg {r['load_avg_before'][0]} → {r['load_avg_after'][0]} on {r['cpus']} CPUs")
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'count':>10}")
    for label, key, count, limit in (("search", "search_ms", r["searches"], 200), ("module page", "page_ms",
                                     r["pages"], 300), ("/health", "health_ms", r["health_probes"], 100)):
        print(f"{label:24}{r[key]['p50']!s:>10}{r[key]['p99']!s:>10}{count:>10}{goal(r[key]['p99'], limit)}")
    print(f"searches/s {r['searches_per_s']} · pushes ok {r['pushes_ok']}/{r['pushes']} "
          f"({r['pushes_per_s']}/s, p50 {r['push_ms']['p50']} ms) · lost versions {r['lost_versions']} · "
          f"server peak RSS {r['server_peak_rss_mb']} MB")
    print(f"server: {r['server_cpu_share']:.0%} of a core, {r['server_cpu_ms_per_request']} ms CPU per request "
          "(a push counted as 4) · one at a time before the load (p50/p99 ms): "
          + ", ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in r["one_at_a_time_ms"].items()))
    print(f"load generator: CPU {r['client_cpu_share']:.0%} of a core, event-loop lag p99 "
          f"{r['client_loop_lag_ms']['p99']} ms · request errors {r['errors']}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
