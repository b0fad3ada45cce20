"""Choosing each row's next token: greedy, or temperature / nucleus sampling with the row's own generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """One row's sampling parameters (OpenAI's ``temperature``, ``top_p`` and ``seed``).

    ``temperature == 0`` is greedy decoding (argmax); otherwise the logits are
    divided by the temperature, the smallest set of tokens whose probability
    reaches ``top_p`` is kept (nucleus sampling, Holtzman et al. 2020) and one
    token is drawn with the row's generator, so a seeded request repeats.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @classmethod
    def make(cls, temperature: float, top_p: float, seed: int | None) -> Sampling:
        """Parameters with a generator seeded by ``seed`` (a random seed when None)."""
        g = torch.Generator()
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return cls(temperature=temperature, top_p=top_p, generator=g)


def next_tokens(logits: torch.Tensor, rows: list[Sampling]) -> list[int]:
    """One token per row from the last position's logits (B, V)."""
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()  # (B,) greedy for every row; sampled rows overwrite theirs
    for i, s in enumerate(rows):
        if s.temperature > 0:
            out[i] = _sample(logits[i] / s.temperature, s.top_p, s.generator)
    return out


def _sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits, dim=-1)  # (V,)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above each token
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())
