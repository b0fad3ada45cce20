"""Continuous (iteration-level) batching on the host's own forward, one composition per row.

The scheduler runs in one thread. Each iteration:

1. rows whose client went away are dropped (their cache rows with them);
2. waiting rows join, up to ``max_batch``: the newcomers are prefilled as one
   group (each row with its own composition through
   :meth:`polymod.Modular.route`) **in chunks**: while other rows are decoding,
   each step prefills at most ``prefill_chunk`` tokens of the group (Sarathi's
   and vLLM's chunked prefill: a long prompt costs every running row a bounded
   delay per step instead of one long stall). When the group's prompts are in,
   their first token is sampled and their key/value cache is appended to the
   running batch's (:mod:`polymod.serving.kv`); with no row decoding the whole
   prompts run at once;
3. one decoding step runs every row in one grouped forward: input (B, 1), the
   batch's cache, per-row positions, and ``model.route(rows)`` so that each
   row's LoRA / IA³ / adapter acts on that row alone;
4. finished rows (EOS, ``max_tokens``, a stop string) leave at once.

A request never waits for another to finish: it joins at the next step.
transformers' own continuous batching (``generate_batch``) packs every request
into one flattened row, so a site sees (1, ΣT, D) and per-row modules cannot
be told apart; docs/serving.md has the measurement.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from polymod.compose import Composition
from polymod.errors import StateError
from polymod.serving import kv
from polymod.serving.sampling import Sampling, next_tokens
from polymod.serving.text import TextStream


class QueueFullError(StateError):
    """The scheduler's waiting queue is full; the client should retry later."""


@dataclass
class Event:
    """What a choice produced in one step: new text, and the finish reason once it ends."""

    index: int
    text: str
    finish: str | None = None
    tokens: int = 0


@dataclass
class Request:
    """One API request: its choices (rows), where its events go and whether its client is still there.

    Args:
        prompt: the prompt's token ids.
        route: the composition every row of the request uses (resident module names), or None.
        n: number of choices.
        max_tokens: tokens to generate at most per choice.
        sampling: one :class:`Sampling` per choice.
        stop: stop strings.
        sink: called from the scheduler thread with each :class:`Event`.
        on_done: called once when every choice has finished or the request was cancelled.
    """

    prompt: list[int]
    route: Composition | None
    n: int
    max_tokens: int
    sampling: list[Sampling]
    stop: list[str]
    sink: Callable[[Event], None]
    on_done: Callable[[Request], None] | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    completion_tokens: int = 0
    _open: int = -1

    def cancel(self) -> None:
        """Mark the request abandoned (client gone); its rows leave at the next step."""
        self.cancelled = True

    def _close_row(self) -> None:
        self._open -= 1
        if self._open == 0 and self.on_done is not None:
            self.on_done(self)


@dataclass
class _Group:
    """Newcomers being prefilled chunk by chunk, with their own left-padded cache until their prompts are in."""

    rows: list[_Row]
    ids: torch.Tensor  # (B, T) left-padded prompts
    mask: torch.Tensor  # (B, T) 1 on prompt tokens
    done: int = 0  # columns prefilled so far
    cache: Any = None


@dataclass
class _Row:
    request: Request
    index: int
    stream: TextStream
    last: int = -1
    n: int = 0  # real (non-padding) tokens in the batch cache
    generated: int = 0
    done: bool = False


class Scheduler:
    """The continuous-batching loop over a :class:`~polymod.Modular` causal LM.

    Args:
        model: the host with its module library (modules are attached by the module cache).
        tokenizer: decodes tokens to text (``decode(ids, skip_special_tokens=True)``).
        eos: token ids that end a choice.
        max_batch: rows decoded together at most.
        max_queue: rows waiting at most; :meth:`submit` raises :class:`QueueFullError` beyond.
        lock: held during every forward; whoever changes the module library holds it too.
        observe: called after each step with (batch size, new tokens, waiting rows).
        prefill_chunk: prompt tokens (padding included) prefilled per step while other rows decode; 0 prefills
            whole prompts in one step (running rows then stall for it).
    """

    def __init__(self, model: Any, tokenizer: Any, eos: set[int], max_batch: int = 8, max_queue: int = 64,
                 lock: threading.RLock | None = None, observe: Callable[[int, int, int], None] | None = None,
                 prefill_chunk: int = 64):
        self.model, self.tokenizer, self.eos = model, tokenizer, set(eos)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.group: _Group | None = None  # newcomers being prefilled
        self.lock = lock or threading.RLock()
        self.observe = observe or (lambda b, t, w: None)
        self.waiting: deque[_Row] = deque()
        self.rows: list[_Row] = []
        self.cache: Any = None
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        # Stack every resident module's weights at each site once per library, not once per set of modules in the
        # batch: that set changes whenever a request joins or leaves (rows.compile_rows, pooled).
        model._row_plans.pooled = True
        params = inspect.signature(model.host.forward).parameters
        self._keep_logits = "logits_to_keep" in params
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.24 says cache
        self.steps = 0
        self.submitted = 0  # requests accepted so far

    # -- the API side --------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request's choices; they join the running batch at the next step.

        Raises:
            QueueFullError: more than ``max_queue`` rows would be waiting.
        """
        with self._wake:
            if any(r.request.cancelled for r in self.waiting):  # abandoned rows give their places back
                self.waiting = deque(r for r in self.waiting if not self._gone(r))
            if len(self.waiting) + request.n > self.max_queue:
                raise QueueFullError(f"the server's queue is full ({len(self.waiting)} waiting rows, at most "
                                     f"{self.max_queue}); retry after a moment")
            request._open = request.n
            self.submitted += 1
            for i in range(request.n):
                self.waiting.append(_Row(request, i, TextStream(self.tokenizer, request.stop)))
            self._wake.notify()

    def poke(self) -> None:
        """Wake the loop (a request was cancelled)."""
        with self._wake:
            self._wake.notify()

    @property
    def batch_size(self) -> int:
        """Rows in the running batch now."""
        return len(self.rows)

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._run, name="polymod-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after the current step; unfinished requests end with finish reason ``abort``."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for row in [*self.rows, *(self.group.rows if self.group else []), *self.waiting]:
            self._finish(row, "abort")
        self.rows, self.waiting, self.cache, self.group = [], deque(), None, None

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.waiting and not self.rows and self.group is None:
                    self._wake.wait()
                if self._stop:
                    return
                room = self.max_batch - len(self.rows) if self.group is None else 0
                new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            try:
                self.step([r for r in new if not self._gone(r)])
            except Exception as exc:  # a failing forward ends the rows in it, never the server
                for row in [*self.rows, *new, *(self.group.rows if self.group else [])]:
                    if not row.done:
                        self._finish(row, "error", text=f"[polymod: generation failed: {exc}]")
                self.rows, self.cache, self.group = [], None, None

    def _gone(self, row: _Row) -> bool:
        if row.request.cancelled and not row.done:
            self._finish(row, "abort")
        return row.done

    def step(self, new: list[_Row]) -> None:
        """One iteration: drop cancelled rows, prefill a chunk of the newcomers (``new`` starts a group), join
        them once their prompts are in, decode every running row one token."""
        produced = 0
        with self.lock, torch.inference_mode():
            self._leave()
            if new:
                self.group = _group(new)
            if self.group is not None:
                produced += self._prefill()
                self._leave()
            if self.rows:
                produced += self._decode()
                self._leave()
        self.steps += 1
        self.observe(len(self.rows), produced, len(self.waiting))

    def _forward(self, routes: list[Composition | None], **kwargs: Any) -> Any:
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        if all(r is None for r in routes):
            return self.model.host(**kwargs, use_cache=True)
        with self.model.route(routes):
            return self.model.host(**kwargs, use_cache=True)

    def _prefill(self) -> int:
        """Prefill the next chunk of the group; once its prompts are in, sample and join (returns tokens made)."""
        g = self.group
        assert g is not None
        keep = [i for i, r in enumerate(g.rows) if not self._gone(r)]
        if not keep:
            self.group = None
            return 0
        if len(keep) < len(g.rows):  # clients gone while their prompts were prefilled
            index = torch.tensor(keep)
            g.rows, g.ids, g.mask = [g.rows[i] for i in keep], g.ids[index], g.mask[index]
            if g.cache is not None:
                kv.keep(g.cache, index)
        t = g.ids.shape[1]
        width = t - g.done
        if self.rows and self.prefill_chunk:  # rows are decoding: a bounded piece per step
            width = min(width, max(1, self.prefill_chunk // len(g.rows)))
        end = g.done + width
        position = (g.mask.cumsum(-1) - 1).clamp(min=0)[:, g.done:end]  # (B, width)
        extra = {} if g.cache is None else {self._cache_arg: g.cache}
        out = self._forward([r.request.route for r in g.rows], input_ids=g.ids[:, g.done:end],
                            attention_mask=g.mask[:, :end], position_ids=position, **extra)
        g.cache, g.done = _cache_of(out), end
        if end < t:
            return 0
        self.group = None
        tokens = next_tokens(out.logits[:, -1], [r.request.sampling[r.index] for r in g.rows])
        self.cache, _, _ = kv.join(self.cache, g.cache)
        for r in g.rows:
            r.n = len(r.request.prompt)
        self.rows.extend(g.rows)
        now = time.perf_counter()
        for r, tok in zip(g.rows, tokens):
            if r.request.first_token is None:
                r.request.first_token = now
            self._emit(r, tok)
        return len(g.rows)

    def _decode(self) -> int:
        t = kv.length(self.cache)
        n = torch.tensor([r.n for r in self.rows])
        mask = (torch.arange(t + 1)[None, :] >= (t - n)[:, None]).long()  # (B, T+1): padding columns are 0
        ids = torch.tensor([[r.last] for r in self.rows])  # (B, 1)
        out = self._forward([r.request.route for r in self.rows], input_ids=ids, attention_mask=mask,
                            position_ids=n[:, None], **{self._cache_arg: self.cache})
        self.cache = _cache_of(out)
        tokens = next_tokens(out.logits[:, -1], [r.request.sampling[r.index] for r in self.rows])
        for r, tok in zip(self.rows, tokens):
            r.n += 1
            self._emit(r, tok)
        return len(tokens)

    def _emit(self, row: _Row, token: int) -> None:
        row.last = token
        row.generated += 1
        row.request.completion_tokens += 1
        if token in self.eos:
            self._finish(row, "stop")
            return
        text = row.stream.push(token)
        if row.stream.stopped:
            self._finish(row, "stop", text)
        elif row.generated >= row.request.max_tokens:
            self._finish(row, "length", text + row.stream.flush())
        elif text:
            row.request.sink(Event(row.index, text, tokens=1))

    def _finish(self, row: _Row, reason: str, text: str = "") -> None:
        if row.done:
            return
        row.done = True
        if reason == "stop" and not row.stream.stopped:
            text += row.stream.flush()
        row.request.sink(Event(row.index, text, finish=reason))
        row.request._close_row()

    def _leave(self) -> None:
        """Remove finished and cancelled rows from the batch and its cache."""
        for r in self.rows:
            self._gone(r)
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            return
        kv.keep(self.cache, torch.tensor(keep))
        kv.cut_front(self.cache, kv.length(self.cache) - max(r.n for r in self.rows))


def _group(rows: list[_Row]) -> _Group:
    """The newcomers' prompts left-padded to one length."""
    lengths = [len(r.request.prompt) for r in rows]
    t = max(lengths)
    ids = torch.zeros(len(rows), t, dtype=torch.long)  # (B, T) left-padded
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - lengths[i]:] = torch.tensor(r.request.prompt)
        mask[i, t - lengths[i]:] = 1
    return _Group(rows, ids, mask)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
