"""Packages: what the hub stores for one version, and the checks every package passes.

A *package* is a directory holding ``module.json`` (the card), and for a
module ``weights.safetensors``; an optional ``README.md`` is free prose.
Nothing else is accepted. A package is identified by its **content hash**
(``sha256``): the sha256 of ``weights.safetensors``, or of ``module.json`` for
a composition, which has no weights. Lineage parents name their parents by
this hash, so lineage survives renames.

This file holds the strict checks used on push and pull:

* :func:`parse_card` — a card from untrusted bytes, every field type-checked, only
  :class:`~polymod.errors.IntegrityError` / :class:`~polymod.errors.FormatError` on bad input;
* :func:`check_safetensors` — the weights really are safetensors, complete and not
  truncated, and not a pickle posing as one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

from polymod.card import FORMAT_VERSION, Card
from polymod.errors import FormatError, IntegrityError
from polymod.hub import names

CARD_FILE = "module.json"
WEIGHTS_FILE = "weights.safetensors"
README_FILE = "README.md"
PACKAGE_FILES = (CARD_FILE, WEIGHTS_FILE, README_FILE)
PULL_RECORD = ".polymod-pull.json"  # what a pull wrote (see hub/unpack.py); never pushed
MAX_CARD_BYTES = 1 << 20
MAX_README_BYTES = 1 << 20
# A safetensors header is JSON that must be parsed before anything else is known; these bound the time and
# memory one upload can cost the server. A LoRA on every linear layer of an 80-layer model has ~1,100 tensors
# and a header of ~200 kB; the limits leave room for 15x that and stop a "header bomb" (millions of empty
# tensors) in milliseconds: the tensors are counted in the raw bytes before the JSON is parsed.
MAX_HEADER_BYTES = 4 << 20
MAX_TENSORS = 16_384

_KIND_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a regular file's bytes, read in 1 MiB chunks (a symbolic link is refused, never followed)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """A package's content hash: sha256 of its weights, or of its card when it has no weights."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    return file_sha256(weights if weights.is_file() else path / CARD_FILE)


def _text(field: str, value: Any, limit: int, multiline: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, str) or len(value) > limit:
        raise FormatError(f"card field {field!r} must be a string of at most {limit} characters, got {value!r:.60}")
    bad = _CONTROL.search(value) if multiline else re.search(r"[\x00-\x1f\x7f]", value)
    if bad:
        raise FormatError(f"card field {field!r} contains control character {bad.group()!r}; remove it")


def _metric(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise FormatError(f"metric {key!r} must be a number or an object with a numeric 'value', got {value!r:.60}")
    number = value.get("value") if isinstance(value, dict) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise FormatError(f"metric {key!r} needs a finite numeric value, got {number!r:.60}")
    if isinstance(value, dict):
        for k, v in value.items():
            if k != "value":
                _text(f"metrics.{key}.{k}", v if isinstance(v, str) else str(v), 256)


def check_card_dict(data: Any) -> None:
    """Type-check every field of a card dict (stricter than :meth:`Card.from_dict`).

    Raises:
        FormatError: the first problem found, naming the field.
    """
    if not isinstance(data, dict):
        raise FormatError(f"a card must be a JSON object, got {type(data).__name__}")
    if data.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"card format_version {data.get('format_version')!r:.40} is not supported; "
                          f"this polymod reads {FORMAT_VERSION}")
    if not isinstance(data.get("kind"), str) or not _KIND_RE.fullmatch(data["kind"]):
        raise FormatError(f"card field 'kind' must be a lowercase kind name such as 'lora', "
                          f"got {data.get('kind')!r:.60}")
    for key in ("config", "host", "metrics"):
        if not isinstance(data.get(key, {}), dict):
            raise FormatError(f"card field {key!r} must be a JSON object")
    for key, check in (("owner", names.check_owner), ("version", names.check_version)):
        if data.get(key) is not None:
            try:
                check(data[key])
            except names.InvalidNameError as exc:
                raise FormatError(f"card field {key!r}: {exc}") from None
    _text("name", data.get("name"), 100)
    for key, limit in (("task", 128), ("language", 64), ("license", 128)):
        _text(key, data.get(key), limit)
    _text("description", data.get("description"), 20_000, multiline=True)
    sites, tags = data.get("sites", []), data.get("tags", [])
    if not isinstance(sites, list) or len(sites) > 100_000:
        raise FormatError("card field 'sites' must be a list of site names")
    for s in sites:
        _text("sites[]", s, 512)
    good_tags = isinstance(tags, list) and all(isinstance(t, str) and _TAG_RE.fullmatch(t) for t in tags)
    if not good_tags or len(tags) > 64:
        raise FormatError(f"card field 'tags' must be a list of at most 64 tags matching {_TAG_RE.pattern}, "
                          f"got {tags!r:.80}")
    for key, value in data.get("metrics", {}).items():
        _text("metrics key", key, 128)
        _metric(key, value)
    _check_lineage(data.get("lineage", {}))


def _check_lineage(lineage: Any) -> None:
    if not isinstance(lineage, dict) or set(lineage) - {"parents", "recipe"}:
        raise FormatError("card field 'lineage' must be an object with 'parents' and 'recipe'")
    parents = lineage.get("parents", [])
    if not isinstance(parents, list) or not isinstance(lineage.get("recipe", {}), dict):
        raise FormatError("lineage 'parents' must be a list and 'recipe' an object")
    for p in parents:
        if not isinstance(p, dict) or set(p) - {"name", "version", "sha256", "weight"}:
            raise FormatError(f"a lineage parent must be an object with name, version, sha256, weight; got {p!r:.80}")
        _text("lineage.parents[].name", p.get("name"), 256)
        if not isinstance(p.get("name"), str):
            raise FormatError("a lineage parent needs a 'name' string")
        _text("lineage.parents[].version", p.get("version"), names.MAX_VERSION_LEN)
        if p.get("sha256") is not None and not (isinstance(p["sha256"], str) and _SHA_RE.fullmatch(p["sha256"])):
            raise FormatError(f"lineage parent sha256 must be 64 lowercase hex digits, got {p['sha256']!r:.80}")
        w = p.get("weight")
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)):
            raise FormatError(f"lineage parent weight must be a finite number, got {w!r:.40}")


def parse_card(raw: bytes) -> Card:
    """Parse untrusted ``module.json`` bytes into a :class:`Card`.

    Raises:
        FormatError: too large, not UTF-8 JSON, too deeply nested, or any field of the wrong type.
    """
    if len(raw) > MAX_CARD_BYTES:
        raise FormatError(f"{CARD_FILE} is {len(raw):,} bytes; the limit is {MAX_CARD_BYTES:,}")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise FormatError(f"{CARD_FILE} is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    check_card_dict(data)
    return Card.from_dict(data)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def card_bytes(card: Card) -> bytes:
    """The canonical ``module.json`` bytes of a card (sorted keys, 2-space indent)."""
    return (json.dumps(card.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


class _TooManyObjects(ValueError):
    pass


def _counting_hook(limit: int):
    """A ``json`` ``object_pairs_hook`` that aborts the parse once more than ``limit`` objects were built."""
    count = 0

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooManyObjects
        return dict(pairs)

    return hook


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_safetensors(f: BinaryIO, size: int, label: str = WEIGHTS_FILE) -> None:
    """Check that ``f`` (``size`` bytes) is one complete safetensors file, in bounded time and memory.

    Reads only the header (at most :data:`MAX_HEADER_BYTES`, describing at most :data:`MAX_TENSORS`
    tensors; the parse stops as soon as either bound is passed). Every tensor needs a known dtype, a
    shape of non-negative integers and data offsets of exactly its size; together the tensors must
    tile the data section without gaps or overlaps. Tensor bytes are covered by the sha256 check.

    Raises:
        IntegrityError: a pickle or zip (``torch.save``) posing as safetensors, a header over the
            limits, a malformed header, or data shorter or longer than the header promises.
    """
    head = f.read(9)
    # A pickle starts with 0x80 and a zip with PK; a safetensors header length can start with 0x80 too (any
    # length ≡ 128 mod 256), so it is a pickle only when the bytes do not also read as a safetensors header.
    (n,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (-1,)
    header_like = 0 < n <= size - 8 and head[8:9] == b"{"
    if (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04") and not header_like:
        raise IntegrityError(f"{label} is a Python pickle / torch.save file, not safetensors; polymod never "
                             "loads pickle. Re-save the weights with safetensors.torch.save_file")
    if len(head) < 8:
        raise IntegrityError(f"{label} is {size} bytes, too short to be safetensors (truncated?)")
    f.seek(-len(head[8:]), 1)
    if n > MAX_HEADER_BYTES:
        raise IntegrityError(f"{label}: safetensors header of {n:,} bytes exceeds the limit of "
                             f"{MAX_HEADER_BYTES:,} bytes (polymod.hub.package.MAX_HEADER_BYTES)")
    if n > size - 8:
        raise IntegrityError(f"{label}: header length {n} exceeds the file ({size} bytes); "
                             "truncated or not safetensors")
    too_many = IntegrityError(f"{label}: the safetensors header lists more than {MAX_TENSORS:,} tensors, the "
                              "limit (polymod.hub.package.MAX_TENSORS)")
    raw = f.read(n)
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # every entry names its offsets: a cheap upper bound
        raise too_many
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_counting_hook(MAX_TENSORS + 2),
                            parse_constant=_reject_constant)
    except _TooManyObjects:
        raise too_many from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise IntegrityError(f"{label}: safetensors header is not JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{label}: safetensors header is not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise IntegrityError(f"{label}: safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise too_many
    spans = []
    for key, entry in header.items():
        try:
            shape, offsets, width = entry["shape"], entry["data_offsets"], _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError) as exc:
            raise IntegrityError(f"{label}: tensor {key!r:.60} has a malformed header entry ({exc!r:.80})") from None
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape) and isinstance(offsets, list)
                and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise IntegrityError(f"{label}: tensor {key!r:.60} needs a shape and two data offsets of non-negative "
                                 f"integers, got {shape!r:.60} and {offsets!r:.60}")
        start, stop = offsets
        if not start <= stop or stop - start != math.prod(shape) * width:
            raise IntegrityError(f"{label}: tensor {key!r:.60} has inconsistent offsets {start}..{stop}")
        spans.append((start, stop, key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            raise IntegrityError(f"{label}: tensor {key!r:.60} starts at byte {start} but the previous tensor ends at "
                                 f"{end}: tensors must tile the data without gaps or overlaps")
        end = stop
    if end != size - 8 - n:
        raise IntegrityError(f"{label}: the header describes {end} data bytes but the file holds {size - 8 - n} "
                             "(truncated or padded)")


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a package file for reading without following a symbolic link, refusing anything but a regular file.

    Raises:
        FormatError: ``path`` is a symbolic link, a directory, a FIFO, a device or a socket.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if os.path.islink(path):
            raise FormatError(f"{path} is a symbolic link; polymod never follows links in a package (a link "
                              "could publish any file on this machine). Copy the file into the package") from None
        raise FormatError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{path} is not a regular file; a package holds only regular files")
    return os.fdopen(fd, "rb")


def package_files(path: str | os.PathLike) -> dict[str, Path]:
    """The files of the package directory ``path`` that a push publishes, by name, checked without following links.

    The pull record (:data:`PULL_RECORD`) left by a pull is skipped.

    Raises:
        FormatError: ``path`` is not a directory, holds names other than :data:`PACKAGE_FILES`, or one of
            them is a symbolic link or not a regular file.
    """
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path} is not a directory; push takes a module directory written by pm.save")
    entries = {p.name: p for p in path.iterdir() if p.name != PULL_RECORD}
    extra = sorted(set(entries) - set(PACKAGE_FILES))
    if extra:
        raise FormatError(f"{path} holds files a package may not contain: {extra[:5]}; allowed: {PACKAGE_FILES}")
    for p in entries.values():
        mode = os.lstat(p).st_mode
        if stat.S_ISLNK(mode):
            raise FormatError(f"{p} is a symbolic link; polymod never follows links in a package (a link could "
                              "publish any file on this machine). Copy the file into the package")
        if not stat.S_ISREG(mode):
            raise FormatError(f"{p} is not a regular file; a package holds only regular files")
    return dict(sorted(entries.items()))


def check_package_dir(path: str | os.PathLike) -> Card:
    """Check a package directory before pushing it: allowed regular files only, valid card, valid weights.

    Returns:
        The parsed card.

    Raises:
        FormatError: unknown files, symbolic links or other non-regular files, a missing card, an invalid
            card, or missing weights for a module.
        IntegrityError: weights that are not safetensors or are truncated.
    """
    files = package_files(path)
    if CARD_FILE not in files:
        raise FormatError(f"{path} is not a polymod package: {CARD_FILE} is missing (write it with pm.save)")
    with open_regular(files[CARD_FILE]) as f:
        card = parse_card(f.read(MAX_CARD_BYTES + 1))
    if card.kind != "composition" and WEIGHTS_FILE not in files:
        raise FormatError(f"{path} has no {WEIGHTS_FILE}; a {card.kind} module needs its weights")
    if WEIGHTS_FILE in files:
        with open_regular(files[WEIGHTS_FILE]) as f:
            check_safetensors(f, os.fstat(f.fileno()).st_size)
    if README_FILE in files:
        with open_regular(files[README_FILE]) as f:
            check_readme(f.read(MAX_README_BYTES + 1))
    return card


def check_readme(raw: bytes) -> None:
    """Check a package's ``README.md``: UTF-8 text of at most :data:`MAX_README_BYTES`.

    Raises:
        FormatError: too large, not UTF-8, or holding NUL or other binary control bytes.
    """
    if len(raw) > MAX_README_BYTES:
        raise FormatError(f"{README_FILE} is over the limit of {MAX_README_BYTES:,} bytes; shorten it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{README_FILE} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    bad = re.search(r"[\x00-\x08\x0e-\x1f\x7f]", text)
    if bad:
        raise FormatError(f"{README_FILE} holds control character {bad.group()!r}; a README is Markdown text")


__all__ = ["CARD_FILE", "MAX_CARD_BYTES", "MAX_HEADER_BYTES", "MAX_README_BYTES", "MAX_TENSORS", "PACKAGE_FILES",
           "PULL_RECORD", "README_FILE", "WEIGHTS_FILE", "card_bytes", "check_card_dict", "check_package_dir",
           "check_readme", "check_safetensors", "content_hash", "file_sha256", "open_regular", "package_files",
           "parse_card"]
