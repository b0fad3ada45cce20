"""Prompt tuning (Lester, Al-Rfou and Constant, 2021, arXiv 2104.08691).

n trainable *soft tokens* P ∈ R^{n×D} are prepended to the embedded input of
the frozen host — the survey's input composition::

    f'(x) = f_θ([P; E(x)])        E: the host's input embedding, [;]: concatenation over tokens

The module acts at the host's *input site* (:mod:`polymod.inputs`): the call's
``input_ids`` become ``inputs_embeds = [P; E(input_ids)]``, the attention mask
gains n attended positions in front, ``position_ids`` (when given) count the
prompt as positions 0..n−1, ``token_type_ids`` (when given) are 0 there, and
token-level ``labels`` are padded with −100 (ignored by the loss) at the prompt
positions. Per-token outputs (logits, hidden states) therefore have n + T
positions, the first n belonging to the prompt, as in PEFT.

Families:

* encoder-only (BERT-like) and decoder-only (GPT-2, Llama): at ``<input>``.
  With ``generate()`` the prompt is inserted on the first forward only (no
  cache, or a cache holding only prefixes); later cached steps only grow the
  mask and shift the positions by n, since the prompt's keys and values are
  already in the cache.
* encoder-decoder (T5): the prompt is prepended to the encoder input (Lester
  et al.'s setting) at ``encoder.<input>``, which ``generate()`` calls directly;
  a parameter-free part at ``decoder.<input>`` grows the decoder's
  cross-attention mask to the longer encoder output.

Defaults: n = 20 (Lester et al., Fig. 3: beyond 20 tokens the gains are
marginal at the larger model sizes); ``init="random"`` draws P from
U(−0.5, 0.5) as in their random-uniform initialisation; ``init="words"`` copies
the host embeddings of given token ids, cycled to n tokens (their
vocabulary/class-label initialisation; PEFT's ``TEXT`` init repeats the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from polymod import inputs
from polymod.errors import ConfigError
from polymod.modules.contract import register
from polymod.sites import INPUT, Site


@register
@dataclass(frozen=True)
class PromptTuning:
    """Configuration of a prompt-tuning module.

    Args:
        length: n, the number of soft tokens (≥ 1).
        init: ``random`` (uniform in ±``init_range``) or ``words`` (embeddings of ``words``).
        words: token ids whose embeddings initialise the prompt (cycled to ``length``);
            see :meth:`from_text` to get them from a tokenizer.
        init_range: half-width of the uniform random initialisation.
        sites: input sites; the ``input`` role resolves per family (see :mod:`polymod.inputs`).
    """

    kind: ClassVar[str] = "prompt"
    length: int = 20
    init: Literal["random", "words"] = "random"
    words: tuple[int, ...] = ()
    init_range: float = 0.5
    sites: str = "input"

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(f"PromptTuning length must be a positive integer, got {self.length!r}")
        if self.init not in ("random", "words"):
            raise ConfigError(f"PromptTuning init must be 'random' or 'words', got {self.init!r}")
        object.__setattr__(self, "words", tuple(self.words))
        if any(not isinstance(w, int) or w < 0 for w in self.words):
            raise ConfigError(f"PromptTuning words must be non-negative token ids, got {self.words!r}")
        if self.init == "words" and not self.words:
            raise ConfigError("PromptTuning(init='words') needs token ids in words=..., "
                              "e.g. PromptTuning.from_text('classify the sentiment', tokenizer)")
        if self.init == "random" and self.words:
            raise ConfigError("PromptTuning got words but init='random'; pass init='words' to use them")
        if not self.init_range > 0:
            raise ConfigError(f"PromptTuning init_range must be positive, got {self.init_range!r}")

    @classmethod
    def from_text(cls, text: str, tokenizer: Any, length: int | None = None, **kwargs: Any) -> PromptTuning:
        """A prompt initialised from the embeddings of ``text``'s tokens.

        Args:
            text: words such as a task description or the class labels.
            tokenizer: a ``transformers`` tokenizer of the host (called without special tokens).
            length: n; default: the number of tokens of ``text``.
            **kwargs: further fields (``sites``).
        """
        ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        if not ids:
            raise ConfigError(f"text {text!r} gives no tokens; give a non-empty text")
        return cls(length=length or len(ids), init="words", words=tuple(ids), **kwargs)

    def check_site(self, site: Site) -> str | None:
        if site.kind != "input":
            return "prompt tuning acts on a call's inputs; use sites='input' (the default) or '<input>'"
        if not site.in_features:
            return "the width of this call's token embeddings is unknown (no get_input_embeddings())"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> nn.Module:
        if site.name == f"decoder.{INPUT}":
            return CrossMaskPart()
        part = PromptPart(self.length, site.in_features)
        embeddings = layer.get_input_embeddings() if layer is not None else None
        if embeddings is not None:
            part.to(device=embeddings.weight.device, dtype=embeddings.weight.dtype)
        part.reset_parameters(self.init_range, self.words, embeddings)
        return part


class PromptPart(nn.Module):
    """The soft prompt P (n, D) at one input site."""

    def __init__(self, length: int, width: int):
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(length, width))  # (n, D)

    def reset_parameters(self, init_range: float = 0.5, words: tuple[int, ...] = (),
                         embeddings: nn.Module | None = None) -> None:
        """Uniform in ±init_range, or the embeddings of ``words`` cycled to n tokens.

        Raises:
            ConfigError: a word id outside the host's vocabulary.
        """
        with torch.no_grad():
            if not words:
                self.prompt.uniform_(-init_range, init_range)
                return
            if embeddings is None:  # loading from disk: the stored weights follow
                self.prompt.zero_()
                return
            vocab = embeddings.weight.shape[0]
            if max(words) >= vocab:
                raise ConfigError(f"word id {max(words)} is outside the host's vocabulary of {vocab} tokens")
            ids = torch.tensor([words[i % len(words)] for i in range(self.prompt.shape[0])],
                               device=embeddings.weight.device)
            self.prompt.copy_(embeddings.weight[ids])  # (n, D)

    def forward(self, x: Any = None, y: Any = None) -> torch.Tensor:
        """The virtual tokens P, (n, D)."""
        return self.prompt

    def add_into(self, module: nn.Module, call: dict[str, Any], weight: float = 1.0) -> dict[str, Any]:
        """The call with weight·P inserted before its tokens (first step) or counted after it (cached steps)."""
        n = self.prompt.shape[0]
        if not inputs.is_first_step(call):
            inputs.grow_mask(call, n)
            inputs.shift_positions(call, n, insert=False)
            return call
        batch, length, _ = inputs.tokens(call)
        embeds = call.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(call["input_ids"])  # (B, T, D)
        prompt = (self.prompt if weight == 1.0 else weight * self.prompt).to(embeds.dtype)
        call["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)  # (B, n+T, D)
        call["input_ids"] = None
        inputs.grow_mask(call, n)
        inputs.shift_positions(call, n, insert=True)
        types = call.get("token_type_ids")
        if types is not None:
            call["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)  # (B, n+T)
        labels = call.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == length:
            pad = labels.new_full((labels.shape[0], n, *labels.shape[2:]), -100)
            call["labels"] = torch.cat([pad, labels], dim=1)  # (B, n+T): the prompt is never a target
        return call

    def extra_repr(self) -> str:
        return f"length={self.prompt.shape[0]}, width={self.prompt.shape[1]}"


class CrossMaskPart(nn.Module):
    """At an encoder-decoder host's decoder call: grow the cross-attention mask to the encoder output.

    The encoder's output is longer than the caller's mask by the number of
    soft tokens prepended at ``encoder.<input>`` (by every stacked prompt
    together), so the mask gains that many attended positions in front.
    Parameter-free.
    """

    def forward(self, x: Any = None, y: Any = None) -> None:
        """No virtual tokens of its own."""
        return None

    def add_into(self, module: nn.Module, call: dict[str, Any], weight: float = 1.0) -> dict[str, Any]:
        states, mask = call.get("encoder_hidden_states"), call.get("encoder_attention_mask")
        if isinstance(states, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            extra = states.shape[1] - mask.shape[1]
            if extra > 0:
                inputs.grow_mask(call, extra, key="encoder_attention_mask")
        return call
