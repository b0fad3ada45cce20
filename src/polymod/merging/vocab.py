"""``tokenizer_source``: merging checkpoints whose vocabularies differ, as ``mergekit-yaml`` does.

A recipe's ``tokenizer_source`` chooses the output vocabulary:

* ``base`` — the base model's tokenizer (the first model's without a base);
* ``union`` — the base's tokenizer, then every token of the other models that it
  lacks (ordinary tokens first, in model order, then added tokens with their
  settings; the first model to add a token decides them);
* a model path — that checkpoint's tokenizer.

Every token-indexed tensor (the input embedding, the output head and its bias:
tensors outside the layers whose first dimension is the model's vocabulary)
of every input is then *permuted* to the output vocabulary before the method
sees it: row i of model m is m's row of token i. A token that model m lacks
gets a default row, chosen per tensor among the models that tensor is merged
from: the only model that has it; else the base model, when it is among them
and has it; else the mean of the models that have it (summed in model order,
in float32); a token no model has gets zeros. Tokens at or beyond a model's
``vocab_size`` (its configured embedding rows) count as absent there. The
output's ``config.json`` gets the new ``vocab_size`` and the output tokenizer is
saved beside the weights. Tied embeddings (no ``lm_head.weight`` in the
checkpoints) stay tied: the one embedding is permuted.

The permuted tensors are never materialised: :class:`VocabView` is a read-only
checkpoint whose tensors are row gathers of the inputs' tensors plus the few
default rows, read block by block like any other input.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from polymod.errors import ConfigError
from polymod.merging.jobs import Job
from polymod.merging.layers import layer_of
from polymod.merging.shards import Checkpoint, TensorInfo

SOURCES = ("base", "union")


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """A checkpoint's (fast) tokenizer.

    Raises:
        ConfigError: the directory holds no loadable tokenizer.
    """
    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"tokenizer_source needs a tokenizer for {path}, and none loads: {exc}") from exc


def config_vocab_size(path: Path) -> int | None:
    """``vocab_size`` from a checkpoint's ``config.json`` (None when absent)."""
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    size = data.get("vocab_size", (data.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def _copy(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory() as tmp:  # a deep copy that the loader normalises as it would on disk
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True)


def union_tokenizer(tokenizers: Sequence[tuple[PreTrainedTokenizerBase, int]]) -> PreTrainedTokenizerBase:
    """The first tokenizer extended by every token of the others that it lacks.

    Args:
        tokenizers: (tokenizer, rows) per model, the base first; ids at or beyond ``rows`` are ignored.
    """
    plain: dict[str, None] = {}  # insertion-ordered set
    added: dict[str, Any] = {}
    for tok, rows in tokenizers:
        plain.update((t, None) for t, i in tok.get_vocab().items() if i < rows)
        for i, info in tok.added_tokens_decoder.items():
            if i < rows:
                added.setdefault(info.content, info)  # the first model's settings win
    out = _copy(tokenizers[0][0])
    known = set(tokenizers[0][0].get_vocab())
    for t in plain:
        if t not in added and t not in known:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def permutation(out_vocab: dict[str, int], vocab: dict[str, int], rows: int) -> torch.Tensor:
    """Row of each output token in a model's tensors, −1 where the model lacks it (id ≥ ``rows`` included)."""
    perm = torch.full((len(out_vocab),), -1, dtype=torch.long)  # (V_out,)
    for t, i in out_vocab.items():
        j = vocab.get(t)
        if j is not None and j < rows:
            perm[i] = j
    return perm


@dataclass
class VocabPlan:
    """The output vocabulary and, per input checkpoint, its permutation into it.

    Attributes:
        tokenizer: the output tokenizer (saved with the merge).
        size: the output vocabulary size (rows of every token-indexed tensor).
        perms: per checkpoint index, the source row of each output token (−1: absent).
        rows: per checkpoint index, its configured vocabulary size.
        groups: per virtual tensor name, (checkpoint, tensor name, the models it is merged
            with in mergekit's order, the base checkpoint among them or None).
    """

    tokenizer: PreTrainedTokenizerBase
    size: int
    perms: dict[int, torch.Tensor]
    rows: dict[int, int]
    groups: dict[str, tuple[int, str, tuple[int, ...], int | None]] = field(default_factory=dict)

    def vocab_tensors(self, ck: Checkpoint, index: int) -> list[str]:
        """The token-indexed tensors of checkpoint ``index``: outside the layers, first dimension its vocabulary."""
        return [n for n, i in ck.infos.items() if layer_of(n) is None and i.shape and i.shape[0] == self.rows[index]
                and (len(i.shape) == 2 or n.endswith("bias"))]

    def view_name(self, ck: int, name: str, group: tuple[int, ...], base: int | None) -> str:
        """Register (and name) the permuted tensor ``name`` of checkpoint ``ck`` merged within ``group``."""
        key = f"{name}@{ck}@{','.join(map(str, group))}@{base}"
        self.groups[key] = (ck, name, group, base)
        return key


def plan_vocabulary(source: str | Path, paths: Sequence[Path], base: int | None) -> VocabPlan:
    """Build the output tokenizer and every checkpoint's permutation (see the module docstring).

    Args:
        source: ``base``, ``union`` or a checkpoint directory holding the tokenizer to use.
        paths: every referenced checkpoint (indexed like the recipe's checkpoints).
        base: index of the base model (None: the first checkpoint stands in, as in mergekit).

    Raises:
        ConfigError: a tokenizer does not load, or the base's tokenizer holds tokens beyond its
            model's vocabulary (mergekit strips those for BPE tokenizers; polymod refuses).
    """
    first = 0 if base is None else base
    toks = [load_tokenizer(p) for p in paths]
    rows = {i: config_vocab_size(p) or len(t.get_vocab()) for i, (p, t) in enumerate(zip(paths, toks))}
    beyond = sorted(t for t, i in toks[first].get_vocab().items() if i >= rows[first])
    if beyond:
        raise ConfigError(f"the tokenizer of {paths[first]} has {len(beyond)} token(s) at or beyond its model's "
                          f"vocab_size {rows[first]} ({', '.join(map(repr, beyond[:3]))}); remove them from its "
                          "tokenizer files (or raise vocab_size with matching embedding rows) before merging")
    if source == "base":
        out = _copy(toks[first])
    elif source == "union":
        order = [first] + [i for i in range(len(paths)) if i != first]
        out = union_tokenizer([(toks[i], rows[i]) for i in order])
    else:
        out = load_tokenizer(Path(source))
    vocab = out.get_vocab()
    perms = {i: permutation(vocab, t.get_vocab(), rows[i]) for i, t in enumerate(toks)}
    return VocabPlan(out, len(vocab), perms, rows)


class VocabView:
    """A read-only checkpoint of permuted token-indexed tensors (see :class:`VocabPlan`).

    Args:
        plan: the vocabulary plan whose ``groups`` name this view's tensors.
        checkpoints: the open input checkpoints, indexed as in the plan.
    """

    def __init__(self, plan: VocabPlan, checkpoints: Sequence[Checkpoint]):
        self.plan, self.cks = plan, checkpoints
        self.path = Path("<permuted vocabulary>")
        self.infos: dict[str, TensorInfo] = {}
        for key, (ck, name, _, _) in plan.groups.items():
            src = checkpoints[ck].infos[name]
            shape = (plan.size, *src.shape[1:])
            self.infos[key] = TensorInfo(src.file, src.dtype, shape, 0, math.prod(shape) * src.dtype.itemsize)
        self._defaults: dict[tuple[str, tuple[int, ...], int | None], dict[int, torch.Tensor]] = {}

    @property
    def names(self) -> list[str]:
        """The permuted tensors' names."""
        return list(self.infos)

    def _row(self, ck: int, name: str, row: int) -> torch.Tensor:
        width = math.prod(self.cks[ck].infos[name].shape[1:])
        return self.cks[ck].read(name, (row * width, (row + 1) * width)).to(torch.float32)

    def defaults(self, name: str, group: tuple[int, ...], base: int | None) -> dict[int, torch.Tensor]:
        """Default rows (float32) of the output tokens that some model of ``group`` lacks."""
        key = (name, group, base)
        if key not in self._defaults:
            perms = torch.stack([self.plan.perms[ck] for ck in group])  # (models, V_out)
            present = perms >= 0
            rows: dict[int, torch.Tensor] = {}
            width = math.prod(self.cks[group[0]].infos[name].shape[1:])
            for token in torch.nonzero(~present.all(0)).view(-1).tolist():
                have = [ck for ck, p in zip(group, present[:, token].tolist()) if p]
                if len(have) == 1:
                    rows[token] = self._row(have[0], name, int(self.plan.perms[have[0]][token]))
                elif not have:
                    rows[token] = torch.zeros(width)
                elif base is not None and base in have:
                    rows[token] = self._row(base, name, int(self.plan.perms[base][token]))
                else:
                    acc = torch.zeros(width)
                    for ck in have:  # in model order, as mergekit sums
                        acc = acc + self._row(ck, name, int(self.plan.perms[ck][token]))
                    rows[token] = acc / len(have)
            self._defaults[key] = rows
        return self._defaults[key]

    def read(self, key: str, span: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read a permuted tensor, or flat entries ``[start, stop)`` of it (as :meth:`Checkpoint.read`)."""
        ck, name, group, base = self.plan.groups[key]
        info = self.infos[key]
        width = math.prod(info.shape[1:])
        lo, hi = (0, info.numel) if span is None else span
        r0, r1 = lo // width, -(-hi // width)
        perm = self.plan.perms[ck][r0:r1].tolist()
        block = torch.empty((r1 - r0, width), dtype=info.dtype)  # (rows, D)
        i = 0
        while i < len(perm):  # runs of consecutive source rows: one read each
            if perm[i] < 0:
                block[i] = self.defaults(name, group, base)[r0 + i].to(info.dtype)
                i += 1
                continue
            j = i + 1
            while j < len(perm) and perm[j] == perm[j - 1] + 1:
                j += 1
            block[i:j] = self.cks[ck].read(name, (perm[i] * width, (perm[j - 1] + 1) * width)).view(j - i, width)
            i = j
        flat = block.view(-1)[lo - r0 * width: hi - r0 * width]
        if out is not None:
            out.view(info.dtype).copy_(flat)
            flat = out.view(info.dtype)
        return flat.reshape(info.shape) if span is None else flat

    def close(self) -> None:
        """Nothing to close: the underlying checkpoints belong to the caller."""


def permute_jobs(jobs: list[Job], plan: VocabPlan, vocab_names: set[str], view: int,
                 group_of: Callable[[Job], tuple[tuple[int, ...], int | None]]) -> list[Job]:
    """The jobs with every token-indexed input read through the permuted view (checkpoint index ``view``).

    Args:
        jobs: the planned jobs (inputs name real checkpoints).
        plan: the vocabulary plan; the permuted tensors are registered in it.
        vocab_names: names of the token-indexed tensors.
        view: the index the :class:`VocabView` will have among the checkpoints.
        group_of: a job's models in mergekit's order (what default rows are chosen among) and
            the base checkpoint when it is among them.
    """
    out = []
    for job in jobs:
        refs = [*job.inputs, *([job.base] if job.base else [])]
        if not any(name in vocab_names for _, name in refs):
            out.append(job)
            continue
        group, base = group_of(job)

        def to_view(ref: tuple[int, str], group: tuple[int, ...] = group, base: int | None = base) -> tuple[int, str]:
            return view, plan.view_name(ref[0], ref[1], group, base)

        out.append(Job(job.name, tuple(map(to_view, job.inputs)), to_view(job.base) if job.base else None, job.spec))
    return out
