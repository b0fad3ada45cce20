"""E8 — zero-shot composition of a library of modules on a held-out task (smoke version).

Claim (Ostapenko et al., ICML 2024; Muqeeth et al., 2024; Zhao et al., 2024):
routing among modules published by others, with no routing data, beats both
the bare host and a uniform composition of the same modules on a task none of
them was trained for; Arrow does so token by token from the modules' weights
alone, retrieval per request from a few examples of each module's data.

Design (this script is the reduced version the issue allows while the machine
is shared; the full E8 — at least 12 modules, 3 seeds, PHATGOOSE, LoraHub and
GenKnowSub contenders — is not run here): host all-MiniLM-L6-v2 (frozen).
LoRA modules (r = 8, queries and values) are trained on four tasks through
fixed zero-shot heads (``common.PROMPTS``): Rotten Tomatoes sentiment, BBC
News topics, chatterbot topics, chatterbot language ID. The held-out task is
IMDB review polarity (first 96 tokens) with its own zero-shot head, fixed for
every contender:

* host: the zero-shot head alone;
* uniform Mix: y + ¼ Σᵢ Δyᵢ (``Mix(..., router=Static())``);
* uniform merge: the ΔW average merged into the host;
* Arrow: ``Mix(..., router=Arrow(top_k=2))``, prototypes from the weights;
* retrieval: ``Retrieval(top_k=1)`` with MiniLM centroids of 16 training texts
  per module (the request text is the review, decoded from its tokens);
* own module: a LoRA trained on IMDB itself (upper bound).

Routing accuracy where the right module is known: the Rotten Tomatoes module
(movie-review sentiment) is the right one for IMDB; reported as retrieval's
share of requests sent to it and Arrow's share of routed weight.
"""

from __future__ import annotations

import time

import common as C
import numpy as np

import polymod as pm
from polymod import assets
from polymod.merging.merge import merge
from polymod.routing import SentenceEncoder, centroid

UPSTREAM = ("rt", "bbc", "chat", "lang")
RIGHT = "rt"


def run(n_upstream: int, n_test: int, epochs: float, examples: int) -> dict:
    C.set_seed(0)
    host = C.load_host()
    model = pm.Modular(host)
    tok = C.tokenizer()
    texts = {}
    for t in UPSTREAM:
        task = C.load_task(t, n_upstream, 50, seed=0)
        C.train_module(model, t, pm.LoRA(rank=8, sites="attn.q|attn.v"), task, C.zero_shot_head(host, t),
                       epochs=epochs)
        texts[t] = tok.batch_decode(task.train.ids[:examples], skip_special_tokens=True)
    imdb = C.load_task("imdb", n_upstream, n_test, seed=0, max_length=96)
    head = C.zero_shot_head(host, "imdb")
    logits_fn = C.headed(host, head)
    r: dict = {"host": C.accuracy(logits_fn, imdb.test)}
    names = list(UPSTREAM)
    model.use(pm.Mix(names))
    r["uniform Mix"] = C.accuracy(logits_fn, imdb.test)
    model.use(None)
    r["uniform merge"] = C.accuracy_of(model, merge({n: model[n] for n in names}, method="linear", lora="cat"),
                                       imdb, head)
    arrow = pm.Arrow(top_k=2)
    model.use(pm.Mix(names, router=arrow))
    r["Arrow"] = C.accuracy(logits_fn, imdb.test)
    r["arrow_share_right"] = arrow.stats.summary()["load"][RIGHT]
    enc = SentenceEncoder.from_pretrained(assets.minilm_path())
    retrieval = pm.Retrieval(top_k=1, encoder=enc)
    retrieval.provide_all({n: centroid(enc, texts[n]) for n in names})
    model.use(pm.Mix(names, router=retrieval))

    def routed(ids, mask):
        with retrieval.requests(tok.batch_decode(ids, skip_special_tokens=True)):
            return logits_fn(ids, mask)

    r["retrieval"] = C.accuracy(routed, imdb.test)
    r["retrieval_share_right"] = retrieval.stats.summary()["load"][RIGHT]
    model.use(None)
    C.train_module(model, "imdb", pm.LoRA(rank=8, sites="attn.q|attn.v"), imdb, head, epochs=epochs)
    model.use("imdb")
    r["own module"] = C.accuracy(logits_fn, imdb.test)
    model.use(None)
    return r


def main(argv=None) -> dict:
    args = C.setup(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    if args.quick:
        n_upstream, n_test, epochs, examples = 128, 100, 1.0, 16
    else:
        n_upstream, n_test, epochs, examples = 400, 400, 2.0, 16
    r = run(n_upstream, n_test, epochs, examples)
    print(r, flush=True)
    contenders = ("host", "uniform Mix", "uniform merge", "Arrow", "retrieval", "own module")
    table = C.markdown_table(["contender", "IMDB accuracy (held out)"], [[c, f"{r[c]:.3f}"] for c in contenders])
    held = r["Arrow"] > r["host"] and r["Arrow"] > max(r["uniform Mix"], r["uniform merge"])
    verdict = (f"Arrow {r['Arrow']:.3f} vs host {r['host']:.3f}, uniform Mix {r['uniform Mix']:.3f}, uniform merge "
               f"{r['uniform merge']:.3f}; retrieval {r['retrieval']:.3f}; own module {r['own module']:.3f}. "
               f"The claim (Arrow above the host and above uniform composition) "
               f"{'held' if held else 'did not hold'} in this one-seed smoke run. Routing to the right module "
               f"(rt): retrieval sent {r['retrieval_share_right']:.2f} of the requests there, Arrow gave it "
               f"{r['arrow_share_right']:.2f} of the routed weight (uniform: {1 / len(UPSTREAM):.2f}).")
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(contenders)), [r[c] for c in contenders], color=["C7", "C1", "C2", "C0", "C4", "C3"])
    ax.set_xticks(range(len(contenders)), contenders, fontsize=8)
    ax.set(ylabel="IMDB test accuracy", title="held-out task, library of 4 modules",
           ylim=(min(r[c] for c in contenders) - 0.1, min(1.0, max(r[c] for c in contenders) + 0.05)))
    body = f"""{__doc__.split(chr(10), 1)[1].strip()}

Upstream: {n_upstream} training examples per task, {epochs:g} epoch(s) (lr 4e-3), seed 0; {n_test} IMDB test
reviews; one seed.

{table}

**Outcome.** {verdict}
"""
    C.write_report(args, "e8_library", "E8 — zero-shot composition of a library (smoke)", body, fig, started)
    return {**{c: r[c] for c in contenders}, "held": held, "mean": float(np.mean([r[c] for c in contenders]))}


if __name__ == "__main__":
    main()
