"""Retrieval routing: pick modules per request by sentence similarity (LoraRetriever, Zhao et al., 2024).

Each module in a library is described by a *centroid*: the mean of a sentence
encoder's embeddings of a few of its training examples (normalised). A request
(one row of the batch) is embedded with the same encoder, and

    cᵢ = cos(e(request), centroidᵢ)
    S  = top-k of c;   wᵢ = 1/k for i ∈ S, else 0

— the uniform average of the retrieved modules, as LoraRetriever's mixture.
With ``Mix(..., aggregate="sum")`` that averages their outputs; with
``aggregate="delta"`` it averages their parameters per row (LoraRetriever's
fusion). ``top_k=1`` picks one module per request, the case a serving engine
that allows one adapter per request can run (:meth:`Retrieval.select` gives
the names).

The router is global and reads no hidden state: it needs the request texts,
given for a ``with`` block by :meth:`Retrieval.requests`. The encoder is any
callable from a list of texts to an (N, d) tensor; :class:`SentenceEncoder`
wraps a transformers encoder with mean pooling (the bundled all-MiniLM-L6-v2:
``SentenceEncoder.from_pretrained(polymod.assets.minilm_path())``). Default
``top_k=1``: LoraRetriever's single-module setting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from polymod.errors import CompositionError, ConfigError, StateError
from polymod.routing.base import Router, RoutingInputs, register_router

Encoder = Callable[[Sequence[str]], torch.Tensor]


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a transformers encoder.

    Args:
        model: a transformers encoder (``AutoModel``), used in eval mode without gradients.
        tokenizer: its tokenizer.
        name: recorded in derived-artifact configs (centroids are only comparable under one encoder).
        max_length: truncation length in tokens.
        batch_size: texts per forward.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, max_length: int = 128, batch_size: int = 32):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_length, self.batch_size = max_length, batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> SentenceEncoder:
        """Load an encoder and tokenizer from a local directory (e.g. ``polymod.assets.minilm_path()``)."""
        return cls(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), Path(path).name, **kwargs)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, d) unit-norm embeddings of ``texts``."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # (B, T, d)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))  # (B, d)
        return F.normalize(torch.cat(out).float(), dim=-1)


def encoder_name(encoder: Encoder) -> str:
    """The name recorded for ``encoder`` (its ``name`` attribute, else its type)."""
    return str(getattr(encoder, "name", type(encoder).__name__))


def centroid(encoder: Encoder, texts: Sequence[str]) -> torch.Tensor:
    """The unit-norm mean embedding of ``texts`` (d,), a module's retrieval centroid.

    Raises:
        ConfigError: no texts.
    """
    if not texts:
        raise ConfigError("a retrieval centroid needs at least one example text")
    return F.normalize(F.normalize(encoder(list(texts)).float(), dim=-1).mean(0), dim=0)


def examples_digest(texts: Sequence[str]) -> str:
    """sha256 of the example texts (part of a centroid's derived-artifact key)."""
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


@register_router
class Retrieval(Router):
    """Per-request top-k retrieval by cosine to each module's centroid (see the module docstring).

    Args:
        top_k: modules per request (default 1).
        encoder: a callable texts → (N, d) embeddings; None until set with :meth:`use_encoder`
            (a composition loaded from JSON has none).

    Raises:
        ConfigError: k not a positive integer.
    """

    name = "retrieval"

    def __init__(self, top_k: int = 1, encoder: Encoder | None = None, level: str = "example"):
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ConfigError(f"Retrieval top_k must be a positive integer, got {top_k!r}")
        if level != "example":
            raise ConfigError(f"Retrieval routes each request (row); level must be 'example', got {level!r}")
        super().__init__(level)
        self.top_k, self.encoder = top_k, encoder
        self._centroids: dict[str, torch.Tensor] = {}
        self._queries: torch.Tensor | None = None

    def use_encoder(self, encoder: Encoder) -> None:
        """Set the sentence encoder (the one the centroids were computed with)."""
        self.encoder = encoder

    def provide(self, name: str, vector: torch.Tensor) -> None:
        """Set candidate ``name``'s centroid (d,)."""
        self._centroids[name] = F.normalize(vector.detach().float().reshape(-1), dim=0)

    def provide_all(self, centroids: Mapping[str, torch.Tensor]) -> None:
        """Set several centroids at once."""
        for name, vector in centroids.items():
            self.provide(name, vector)

    def check_candidates(self, candidates: list[str]) -> None:
        missing = [c for c in candidates if c not in self._centroids]
        if missing:
            raise CompositionError(f"{self} has no centroid for {', '.join(missing)}; give one with "
                                   "router.provide(name, centroid(encoder, examples)) or build the router with "
                                   "Library.retrieval(...)")
        if self.top_k > len(candidates):
            raise CompositionError(f"Retrieval(top_k={self.top_k}) needs at least {self.top_k} candidates; the Mix "
                                   f"has {len(candidates)}")

    def scores(self, texts: Sequence[str], candidates: Sequence[str] | None = None) -> torch.Tensor:
        """Cosine of each text to each candidate's centroid, (N, E).

        Raises:
            StateError: no encoder set.
        """
        if self.encoder is None:
            raise StateError(f"{self} has no sentence encoder; call router.use_encoder(encoder) first")
        names = list(candidates if candidates is not None else self.candidates)
        table = torch.stack([self._centroids[n] for n in names])  # (E, d)
        return F.normalize(self.encoder(list(texts)).float(), dim=-1) @ table.t()  # (N, E)

    def select(self, texts: Sequence[str], candidates: Sequence[str] | None = None) -> list[list[str]]:
        """The top-k candidate names per text (best first), e.g. for ``model.route`` with top_k=1."""
        names = list(candidates if candidates is not None else self.candidates)
        top = self.scores(texts, names).topk(min(self.top_k, len(names)), dim=-1).indices  # (N, k)
        return [[names[i] for i in row] for row in top.tolist()]

    @contextmanager
    def requests(self, texts: Sequence[str]) -> Iterator[None]:
        """Route the host calls of a ``with`` block by these request texts, one per batch row."""
        saved = self._queries
        self._queries = self.scores(texts)  # (B, E)
        try:
            yield
        finally:
            self._queries = saved

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        if self._queries is None:
            raise StateError(f"{self} routes by the request texts; run the host inside "
                             "`with router.requests(texts):`")
        rows = y.shape[0]
        if self._queries.shape[0] != rows:
            raise StateError(f"{self} was given {self._queries.shape[0]} request texts for a batch of {rows} rows; "
                             "give one text per row")
        top = self._queries.topk(self.top_k, dim=-1).indices  # (B, k)
        w = torch.zeros_like(self._queries).scatter(-1, top, 1.0 / self.top_k).to(device=y.device, dtype=y.dtype)
        self.stats.update(w)
        return w  # (B, E)

    def cache_key(self, inputs: RoutingInputs, y: torch.Tensor) -> Any:
        return (y.shape[0],)

    def config(self) -> dict[str, Any]:
        return {"top_k": self.top_k}
