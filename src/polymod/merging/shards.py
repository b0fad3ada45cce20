"""Reading and writing (sharded) safetensors checkpoints tensor by tensor, in bounded memory.

safetensors is a tiny format: an 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian
bytes. That makes both directions streamable without memory-mapping whole
files (whose touched pages would count towards the process' resident memory):

* :class:`Checkpoint` reads any row range of any tensor with one ``pread``
  into a fresh buffer;
* :class:`ShardedWriter` plans every output shard's header up front (shapes
  and dtypes are known before any value is computed), then appends each
  tensor's bytes as they are produced, and finally writes Hugging Face's
  ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from polymod.errors import FormatError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, in the file's byte order.

    Raises:
        FormatError: the file is not a valid safetensors file.
    """
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{file} is not a readable safetensors file: {exc}") from exc
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in DTYPES:
            raise FormatError(f"{file}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        out[name] = TensorInfo(file, DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + begin, 8 + n + end)
    return dict(sorted(out.items(), key=lambda kv: kv[1].start))


class Checkpoint:
    """A safetensors checkpoint: a file, a directory with one, or a sharded directory with an index.

    Args:
        path: the file or directory.

    Raises:
        FormatError: no safetensors weights at ``path``, or an unreadable file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files = checkpoint_files(self.path)
        self.infos: dict[str, TensorInfo] = {}
        for file in self.files:
            self.infos.update(read_header(file))
        self._fds: dict[Path, int] = {}

    @property
    def names(self) -> list[str]:
        """Tensor names, shard by shard in byte order."""
        return list(self.infos)

    def read(self, name: str, span: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read a tensor (its shape), or flat entries ``[start, stop)`` of it (1-D).

        Args:
            name: the tensor.
            span: a flat entry range; None reads the whole tensor.
            out: a contiguous uint8 buffer of exactly the bytes needed, to read into
                (default: fresh memory).
        """
        info = self.infos[name]
        start, end, shape = info.start, info.end, info.shape
        if span is not None:
            size = info.dtype.itemsize
            start, end, shape = info.start + span[0] * size, info.start + span[1] * size, (span[1] - span[0],)
        buf = torch.empty(end - start, dtype=torch.uint8) if out is None else out
        if buf.numel() != end - start or buf.dtype != torch.uint8:
            raise ValueError(f"read({name!r}): out must be a uint8 buffer of {end - start} bytes")
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        view, done = memoryview(buf.numpy()), 0
        while done < end - start:
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise FormatError(f"{info.file} is truncated: tensor {name!r} needs bytes up to {end}")
            done += got
        return buf.view(info.dtype).reshape(shape)

    def close(self) -> None:
        """Close the open files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint (the index's shards when there is one)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FormatError(f"{path} does not exist")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FormatError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FormatError(f"{index} names shards that do not exist: {', '.join(missing[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path} holds no .safetensors files")
    return files


class ShardedWriter:
    """Writes tensors into shards of at most ``max_shard_bytes``, streaming their bytes.

    Tensors must be written in the order given, each as one or more consecutive
    row chunks. Shards are named ``model-0000i-of-0000n.safetensors`` (or
    ``model.safetensors`` when there is one) and listed in the index file.

    Args:
        out_dir: the output directory (created).
        layout: ``(name, dtype, shape)`` of every tensor, in writing order.
        max_shard_bytes: the shard size limit (a larger single tensor gets its own shard).
    """

    def __init__(self, out_dir: str | os.PathLike, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in layout:
            nbytes = math.prod(entry[2]) * entry[1].itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        n = len(groups)
        self._shards = [("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors", g)
                        for i, g in enumerate(groups)]
        self._order = [(e[0], i) for i, (_, g) in enumerate(self._shards) for e in g]
        self._sizes = {e[0]: math.prod(e[2]) * e[1].itemsize for _, g in self._shards for e in g}
        self._dtypes = {e[0]: e[1] for _, g in self._shards for e in g}
        self._pos, self._written, self._shard, self._file = 0, 0, -1, None
        self.total_size = sum(self._sizes.values())

    def _open(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        name, group = self._shards[index]
        header, offset = {}, 0
        for tname, dtype, shape in group:
            nbytes = math.prod(shape) * dtype.itemsize
            header[tname] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # pad so that the data starts 8-byte aligned
        self._file = open(self.out_dir / (name + ".tmp"), "wb")  # closed by the next _open or close()
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = index

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next row chunk of tensor ``name`` (which must be the one due)."""
        due, shard = self._order[self._pos]
        if name != due:
            raise RuntimeError(f"ShardedWriter expected tensor {due!r}, got {name!r}")
        if chunk.dtype != self._dtypes[name]:
            raise RuntimeError(f"ShardedWriter: {name} chunk is {chunk.dtype}, planned {self._dtypes[name]}")
        if shard != self._shard:
            self._open(shard)
        data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._written += data.nbytes
        if self._written > self._sizes[name]:
            raise RuntimeError(f"ShardedWriter: more bytes written for {name} than its shape holds")
        if self._written == self._sizes[name]:
            self._pos, self._written = self._pos + 1, 0

    def close(self) -> Path:
        """Finish: check completeness, rename the shards into place, write the index. Returns the index path."""
        while self._pos < len(self._order) and self._sizes[self._order[self._pos][0]] == 0:
            self.write(self._order[self._pos][0], torch.empty(0, dtype=self._dtypes[self._order[self._pos][0]]))
        if self._pos != len(self._order):
            raise RuntimeError(f"ShardedWriter closed before tensor {self._order[self._pos][0]!r} was written")
        if self._file is not None:
            self._file.close()
            self._file = None
        weight_map = {}
        for name, group in self._shards:
            os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
            weight_map.update({e[0]: name for e in group})
        index = self.out_dir / INDEX_FILE
        index.write_text(json.dumps({"metadata": {"total_size": self.total_size}, "weight_map": weight_map},
                                    indent=2) + "\n")
        return index


class BackgroundWriter:
    """A :class:`ShardedWriter` whose writes run in a second thread, overlapping the merge's reads and arithmetic.

    ``write`` hands a chunk over and returns; at most one chunk waits while another is
    being written, so a caller that cycles through :data:`WRITE_SLOTS` buffers never
    overwrites one that is still queued. A failed write is raised by the next ``write``
    or by ``close``.
    """

    def __init__(self, writer: ShardedWriter):
        self.writer = writer
        self._queue: queue.Queue[tuple[str, torch.Tensor] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="polymod-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:  # handed to the merging thread
                    self._error = exc

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Queue the next row chunk of tensor ``name`` (see :meth:`ShardedWriter.write`)."""
        if self._error is not None:
            raise self._error
        self._queue.put((name, chunk))

    def close(self) -> Path:
        """Wait for the queued writes, then finish as :meth:`ShardedWriter.close`."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.writer.close()

    def abort(self) -> None:
        """Stop the thread without finishing the shards (after an error in the merge)."""
        self._queue.put(None)
        self._thread.join()


WRITE_SLOTS = 3  # buffers a caller of BackgroundWriter cycles through: one queued, one being written, one filled

_OUTPUT_MARKERS = ("*.safetensors", "config.json", INDEX_FILE, "merge_recipe.json")


@contextmanager
def staged_output(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh staging directory beside ``out_dir`` that replaces it whole on success.

    A merge writes everything into the staging directory; only when it completes is
    an existing ``out_dir`` moved aside, the staging directory renamed into place
    (one ``rename`` on the same file system) and the old one deleted. So an output
    directory never mixes shards of two merges, and a failed merge leaves it as it was.

    Raises:
        FormatError: ``out_dir`` is a file, or a non-empty directory that holds no
            checkpoint (so replacing it would delete someone's files).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FormatError(f"output {out} is a file; give a directory for the merged checkpoint")
    if out.is_dir() and any(out.iterdir()) and not any(any(out.glob(m)) for m in _OUTPUT_MARKERS):
        raise FormatError(f"output {out} is a non-empty directory that holds no checkpoint; a merge replaces its "
                          "output directory whole, so give a new or empty directory (or a previous merge's)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
