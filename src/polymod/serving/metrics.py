"""Server metrics in Prometheus' text exposition format (``GET /metrics``), without a client library."""

from __future__ import annotations

import threading
import time
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters, gauges and the time-to-first-token histogram of one server (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, status) -> count
        self.cache: Counter[tuple[str, str]] = Counter()  # (event, tier) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.batch_size = 0
        self.peak_batch = 0
        self.queue_depth = 0
        self.steps = 0
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self._window: list[tuple[float, int]] = []  # (time, tokens) of the last steps, for tokens/s
        self.started = time.time()

    def request(self, endpoint: str, status: int) -> None:
        """Count one finished HTTP request."""
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def cache_event(self, event: str, tier: str) -> None:
        """Count a module cache hit, miss or eviction in a tier."""
        with self._lock:
            self.cache[(event, tier)] += 1

    def step(self, batch: int, tokens: int, waiting: int) -> None:
        """Record one scheduler step: the batch size after it, tokens produced and rows waiting."""
        now = time.perf_counter()
        with self._lock:
            self.batch_size, self.queue_depth, self.steps = batch, waiting, self.steps + 1
            self.peak_batch = max(self.peak_batch, batch)
            self.generation_tokens += tokens
            self._window.append((now, tokens))
            while self._window and self._window[0][0] < now - 10.0:
                self._window.pop(0)

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        """Record one request's time to first token."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.ttft_sum += seconds
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft[i] += 1

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 s."""
        with self._lock:
            if len(self._window) < 2:
                return 0.0
            span = max(time.perf_counter() - self._window[0][0], 1e-6)
            return sum(t for _, t in self._window) / span

    def render(self, cache_sizes: dict[str, int]) -> str:
        """The exposition text."""
        rate = self.tokens_per_second()
        with self._lock:
            lines = ["# HELP polymod_requests_total HTTP requests by endpoint and status.",
                     "# TYPE polymod_requests_total counter"]
            lines += [f'polymod_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP polymod_prompt_tokens_total Prompt tokens prefilled.",
                      "# TYPE polymod_prompt_tokens_total counter", f"polymod_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP polymod_generation_tokens_total Tokens generated.",
                      "# TYPE polymod_generation_tokens_total counter",
                      f"polymod_generation_tokens_total {self.generation_tokens}",
                      "# HELP polymod_generation_tokens_per_second Generated tokens per second (last 10 s).",
                      "# TYPE polymod_generation_tokens_per_second gauge",
                      f"polymod_generation_tokens_per_second {rate:.3f}",
                      "# HELP polymod_batch_size Rows in the running batch.", "# TYPE polymod_batch_size gauge",
                      f"polymod_batch_size {self.batch_size}",
                      "# HELP polymod_queue_depth Rows waiting to join the batch.", "# TYPE polymod_queue_depth gauge",
                      f"polymod_queue_depth {self.queue_depth}",
                      "# HELP polymod_scheduler_steps_total Scheduler iterations.",
                      "# TYPE polymod_scheduler_steps_total counter", f"polymod_scheduler_steps_total {self.steps}",
                      "# HELP polymod_module_cache_total Module cache hits, misses and evictions per tier.",
                      "# TYPE polymod_module_cache_total counter"]
            lines += [f'polymod_module_cache_total{{event="{e}",tier="{t}"}} {n}'
                      for (e, t), n in sorted(self.cache.items())]
            lines += ["# HELP polymod_modules Modules held per cache tier.", "# TYPE polymod_modules gauge"]
            lines += [f'polymod_modules{{tier="{k}"}} {v}' for k, v in sorted(cache_sizes.items())]
            lines += ["# HELP polymod_time_to_first_token_seconds Time from arrival to the first token.",
                      "# TYPE polymod_time_to_first_token_seconds histogram"]
            total = 0
            for bound, n in zip(TTFT_BUCKETS, self.ttft):
                total += n
                lines.append(f'polymod_time_to_first_token_seconds_bucket{{le="{bound}"}} {total}')
            total += self.ttft[-1]
            lines += [f'polymod_time_to_first_token_seconds_bucket{{le="+Inf"}} {total}',
                      f"polymod_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"polymod_time_to_first_token_seconds_count {total}"]
        return "\n".join(lines) + "\n"
