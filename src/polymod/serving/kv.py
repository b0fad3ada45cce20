"""The running batch's key/value cache: rows join, leave and stay left-aligned.

The native engine keeps one transformers ``DynamicCache`` for the whole running
batch, shaped (B, H, T, d) per layer, with every row's tokens right-aligned
(left padding). A row that joins is prefilled on its own (or with the other
newcomers), then both caches are left-padded to the same length T and
concatenated on the batch dimension; a row that leaves is dropped with one
``index_select``; columns that are padding for every remaining row are cut.
Padding columns are masked out by the attention mask, so their zeros never
reach a softmax.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from polymod.errors import ConfigError


def check_layers(cache: DynamicCache) -> None:
    """Refuse caches whose layers are not plain growing ones (sliding windows keep a ring, not columns).

    Raises:
        ConfigError: a layer of another type.
    """
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise ConfigError(f"layer {i} of the host's cache is a {type(layer).__name__}; the native serving engine "
                              "batches only full-attention caches (DynamicLayer). Serve this host with one request "
                              "at a time or a host without sliding-window attention")


def length(cache: DynamicCache | None) -> int:
    """T, the number of columns (tokens, padding included) in the cache."""
    return 0 if cache is None else cache.get_seq_length()


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    zeros = t.new_zeros(*t.shape[:-2], n, t.shape[-1])  # (B, H, n, d)
    return torch.cat([zeros, t], dim=-2)


def join(running: DynamicCache | None, new: DynamicCache) -> tuple[DynamicCache, int, int]:
    """Append ``new``'s rows to ``running``, left-padding the shorter one; returns (cache, pad_old, pad_new).

    ``pad_old`` / ``pad_new`` are the columns added in front of the old / new rows.
    """
    check_layers(new)
    if running is None or not running.layers or running.layers[0].keys is None:
        return new, 0, 0
    t_old, t_new = length(running), length(new)
    t = max(t_old, t_new)
    for old_layer, new_layer in zip(running.layers, new.layers):
        old_layer.keys = torch.cat([_pad(old_layer.keys, t - t_old), _pad(new_layer.keys, t - t_new)], dim=0)
        old_layer.values = torch.cat([_pad(old_layer.values, t - t_old), _pad(new_layer.values, t - t_new)], dim=0)
    return running, t - t_old, t - t_new


def keep(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only the batch rows ``rows`` (a 1-D index tensor), in that order."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)


def cut_front(cache: DynamicCache, n: int) -> None:
    """Drop the first ``n`` columns (padding for every row)."""
    if n <= 0:
        return
    for layer in cache.layers:
        layer.keys = layer.keys[..., n:, :].contiguous()
        layer.values = layer.values[..., n:, :].contiguous()
