"""A safetensors header whose length is 128 mod 256 starts with byte 0x80, like a pickle: it must still pass."""

from __future__ import annotations

import io
import json
import struct

import pytest

from polymod.errors import IntegrityError
from polymod.hub.package import check_safetensors


def _safetensors(header_len: int) -> bytes:
    body = {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    text = json.dumps(body)
    text += " " * (header_len - len(text))  # safetensors pads its header with spaces
    return struct.pack("<Q", header_len) + text.encode() + b"\0\0\0\0"


def test_header_length_128_mod_256_is_not_a_pickle():
    data = _safetensors(384)
    assert data[:1] == b"\x80"
    check_safetensors(io.BytesIO(data), len(data))  # no error


def test_a_real_pickle_is_still_refused():
    data = b"\x80\x04\x95" + b"\0" * 40
    with pytest.raises(IntegrityError, match="pickle"):
        check_safetensors(io.BytesIO(data), len(data))
