"""The streaming engine: one job per output tensor, each merged block by block.

A :class:`Job` names an output tensor, the input tensors it is made from (a
checkpoint and a tensor name each, so layers can be renamed and restacked), the
base tensor when the method works on task vectors θᵢ − θ₀, and the resolved
method for this tensor (parameters may differ per tensor: per-layer gradients,
``filter:`` overrides). :func:`run_jobs` streams every job into a
:class:`~polymod.merging.shards.ShardedWriter`: an optional statistics pass
(one full input at a time, or blocks of all inputs), then the elementwise pass
over flat blocks, so peak memory is a few copies of the largest tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from polymod.merging.elementwise import ElementwiseMerge, ElementwiseSpec
from polymod.merging.interp import GroupedMerge, InterpSpec
from polymod.merging.methods import MergeSpec, TensorMerge
from polymod.merging.shards import WRITE_SLOTS, BackgroundWriter, Checkpoint, ShardedWriter

TensorRef = tuple[int, str]  # (checkpoint index, tensor name)
HOLD_BYTES = 384 * 1024**2  # inputs of one tensor held between the statistics and the merge pass


@dataclass(frozen=True)
class Job:
    """One output tensor: ``base + M(inputs − base)`` (or ``M(inputs)`` without a base)."""

    name: str
    inputs: tuple[TensorRef, ...]
    base: TensorRef | None
    spec: MergeSpec | InterpSpec | ElementwiseSpec


class Merger(Protocol):
    """What the engine asks of a per-tensor merger (``TensorMerge``, ``GroupedMerge``)."""

    needs_stats: bool
    needs_block_stats: bool
    align: int

    def observe(self, index: int, delta: torch.Tensor, inplace: bool = False) -> None: ...

    def observe_block(self, xs: list[torch.Tensor], offset: int) -> None: ...

    def __call__(self, xs: list[torch.Tensor], offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor: ...


MERGERS: dict[type, Callable[[object, str, tuple[int, ...]], Merger]] = {
    MergeSpec: lambda spec, name, shape: TensorMerge(spec, name, int(torch.Size(shape).numel()), shape=shape),
    InterpSpec: lambda spec, name, shape: GroupedMerge(spec, name, shape),
    ElementwiseSpec: lambda spec, name, shape: ElementwiseMerge(spec, name, shape),
}


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of a merge: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Scratch:
    """Reusable read buffers: fresh allocations of large buffers cost a page fault per page."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self._turn = 0

    def handed_over(self, key: str, nbytes: int) -> torch.Tensor:
        """A buffer for a chunk given to the background writer: one of WRITE_SLOTS, in turn."""
        self._turn = (self._turn + 1) % WRITE_SLOTS
        return self(f"{key}#{self._turn}", nbytes)

    def __call__(self, key: str, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]


def run_jobs(checkpoints: list[Checkpoint], jobs: list[Job], out_dir: Path, *, dtype: torch.dtype | None,
             shard_bytes: int, block: int, progress: Callable[[str, int], None] | None = None) -> None:
    """Stream every job into sharded safetensors in ``out_dir`` (in one intra-op thread).

    Args:
        checkpoints: the open inputs, indexed by the jobs' tensor references.
        jobs: the output tensors, in writing order.
        out_dir: where shards and index are written.
        dtype: output dtype of floating tensors (default: each reference tensor's).
        shard_bytes: maximum bytes per shard.
        block: entries read, merged and written at a time.
        progress: called as ``progress(tensor_name, bytes)`` after each tensor.
    """
    infos = [checkpoints[ck].infos[t] for ck, t in (job.base or job.inputs[0] for job in jobs)]
    layout = [(job.name, dtype if dtype is not None and i.dtype.is_floating_point else i.dtype, i.shape)
              for job, i in zip(jobs, infos)]
    threads = torch.get_num_threads()
    # The kernels work in cache-sized slices; PyTorch's intra-op threads only add a barrier per
    # operation there (costly on a busy machine), so the merge runs in one thread.
    torch.set_num_threads(1)
    writer = BackgroundWriter(ShardedWriter(out_dir, layout, shard_bytes))  # writes overlap reads and arithmetic
    try:
        scratch = _Scratch()
        for job, (_, out_dtype, _), info in zip(jobs, layout, infos):
            _stream_tensor(job, checkpoints, writer, out_dtype, block, scratch)
            if progress is not None:
                progress(job.name, info.end - info.start)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        torch.set_num_threads(threads)


def _stream_tensor(job: Job, cks: list[Checkpoint], writer: BackgroundWriter, out_dtype: torch.dtype, block: int,
                   scratch: _Scratch) -> None:
    ref_ck, ref_name = job.base or job.inputs[0]
    info = cks[ref_ck].infos[ref_name]
    if not info.dtype.is_floating_point:  # integer buffers travel from the reference unchanged
        writer.write(job.name, cks[ref_ck].read(ref_name))
        return
    spec = job.spec
    if (isinstance(spec, MergeSpec) and spec.method == "linear" and len(job.inputs) == 1 and job.base is None
            and spec.weights == (1.0,) and spec.lam == 1.0 and info.dtype == out_dtype):
        for start in range(0, info.numel, block):  # a plain copy (passthrough): bytes in, bytes out
            span = (start, min(info.numel, start + block))
            writer.write(job.name, cks[ref_ck].read(ref_name, span, out=scratch.handed_over("copy", (span[1] - start)
                                                                               * info.dtype.itemsize)))
        return
    work = work_dtype(info.dtype)

    def read(ref: TensorRef, key: str, span: tuple[int, int] | None) -> torch.Tensor:
        ck = cks[ref[0]]
        src = ck.infos[ref[1]]
        n = src.numel if span is None else span[1] - span[0]
        return ck.read(ref[1], span, out=scratch(key, n * src.dtype.itemsize)).to(work)

    merger = MERGERS[type(job.spec)](job.spec, job.name, info.shape)
    if merger.needs_stats:  # one full task vector at a time: base + one input in memory
        b = read(job.base, "base-full", None) if job.base is not None else None
        for i, ref in enumerate(job.inputs):
            x = read(ref, "input-full", None)
            merger.observe(i, x.sub_(b) if b is not None else x, inplace=True)
    align = merger.align
    block = max(align, block // align * align)
    spans = [(s, min(info.numel, s + block)) for s in range(0, info.numel, block)]

    held = None  # two passes over blocks of all inputs: read them once when they fit in HOLD_BYTES
    if merger.needs_block_stats and (len(job.inputs) + (job.base is not None)) * info.numel * work.itemsize \
            <= HOLD_BYTES:
        b_full = read(job.base, "base-full", None).reshape(-1) if job.base is not None else None
        xs_full = [read(ref, f"held{i}", None).reshape(-1) for i, ref in enumerate(job.inputs)]
        held = (b_full, [x.sub_(b_full) for x in xs_full] if b_full is not None else xs_full)

    def inputs(span: tuple[int, int]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        if held is not None:
            return (held[0][span[0]:span[1]] if held[0] is not None else None,
                    [x[span[0]:span[1]] for x in held[1]])
        b = read(job.base, "base", span) if job.base is not None else None
        xs = [read(ref, f"input{i}", span) for i, ref in enumerate(job.inputs)]
        return b, [x.sub_(b) for x in xs] if b is not None else xs

    if merger.needs_block_stats:
        for span in spans:
            merger.observe_block(inputs(span)[1], span[0])
    if info.numel == 0:
        writer.write(job.name, torch.empty(info.shape, dtype=out_dtype))
    for span in spans:  # flat blocks: bounded memory, shape-agnostic kernels
        b, xs = inputs(span)
        out = scratch.handed_over("out", (span[1] - span[0]) * work.itemsize).view(work)
        mixed = merger(xs, offset=span[0], out=out)
        writer.write(job.name, (mixed if b is None else mixed.add_(b)).to(out_dtype))
