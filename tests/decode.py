"""Greedy decoding without a cache: the reference for ``generate()`` with input-composition modules."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_without_cache(host: torch.nn.Module, batch: dict[str, torch.Tensor],
                         steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by full forwards with ``use_cache=False``.

    Returns the sequences ``generate`` returns and the next-token logits of each
    step, (steps, B, V), to compare with ``generate(..., output_logits=True)``.

    Decoder-only hosts get ``generate``'s position ids (cumulative mask − 1), so
    left-padded batches compare like for like.
    """
    scores: list[torch.Tensor] = []
    if host.config.is_encoder_decoder:
        start = host.config.decoder_start_token_id
        out = torch.full((batch["input_ids"].shape[0], 1), start, dtype=torch.long)
        for _ in range(steps):
            scores.append(host(**batch, decoder_input_ids=out, use_cache=False).logits[:, -1])
            out = torch.cat([out, scores[-1].argmax(-1, keepdim=True)], dim=1)
        return out, torch.stack(scores)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        scores.append(host(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1])
        ids = torch.cat([ids, scores[-1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids, torch.stack(scores)


def generate_matches_greedy(host: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int = 4) -> torch.Tensor:
    """Assert that cached ``generate`` gives the tokens and logits of uncached greedy decoding; returns the logits."""
    out = host.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                        output_logits=True, return_dict_in_generate=True)
    tokens, logits = greedy_without_cache(host, batch, steps)
    torch.testing.assert_close(out.sequences, tokens, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(out.logits), logits, rtol=1e-5, atol=1e-5)
    return logits


def left_padded(batch: dict[str, torch.Tensor], pad: int = 0) -> dict[str, torch.Tensor]:
    """The batch with its first row left-padded by two tokens (mask 0 there)."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    ids[0, :2], mask[0, :2] = pad, 0
    return {**batch, "input_ids": ids, "attention_mask": mask}
