"""Data-parallel training with ``torch.distributed``: only module gradients cross processes.

Launch any training script (or ``polymod train``) with ``torchrun
--nproc_per_node N``; :func:`init_from_env` joins the process group that
``torchrun`` describes in the environment (gloo on CPU, NCCL on CUDA). Each
optimiser step, every rank computes gradients on its shard of the global
batch and :func:`all_reduce_gradients` averages the *trained* parameters'
gradients in one flat buffer — the frozen host never has gradients and is never
communicated. This is the arithmetic of ``DistributedDataParallel`` without its
wrapper, which would need ``find_unused_parameters`` for routed modules (a
module a batch does not route to has no gradient; here it counts as zero) and
would broadcast the whole host at start-up.

With equal shards, the mean of the ranks' mean losses is the mean loss over
the global batch, so the update equals a single-process step on that batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from polymod.errors import ConfigError


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by ``torchrun``'s environment variables.

    Args:
        backend: ``gloo`` or ``nccl``; None picks NCCL when CUDA is available, else gloo.

    Returns:
        True when a multi-process group is (now) active, False for a single process.
    """
    if dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch.

    Raises:
        ConfigError: the global batch does not split evenly.
    """
    if len(indices) % world:
        raise ConfigError(f"batch_size {len(indices)} does not split over {world} processes; "
                          f"use a multiple of {world}")
    size = len(indices) // world
    return list(indices[rank * size:(rank + 1) * size])


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (identical initial modules)."""
    if not is_distributed():
        return
    params = list(params)
    if not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])  # (P,)
    dist.broadcast(flat, src=src)
    with torch.no_grad():
        for p, value in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(value.view_as(p))


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks, in one flat all-reduce.

    A parameter without a gradient on a rank (a module its shard did not route
    to) contributes zeros; one that has no gradient on *any* rank keeps
    ``grad = None``, so the optimiser skips it exactly as a single process would.
    """
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [present])  # (P + n,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    values, present = flat[:-len(params)], flat[-len(params):]
    values /= dist.get_world_size()
    for p, value, seen in zip(params, values.split([p.numel() for p in params]), present.tolist()):
        p.grad = value.view_as(p).clone() if seen else None


def all_reduce_sums(values: Sequence[float]) -> list[float]:
    """Sum a few numbers over ranks (evaluation totals)."""
    if not is_distributed():
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()

