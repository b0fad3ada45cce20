"""What a host announces in the DHT, and how a reader checks it (no hivemind import here).

A hosted module is described by one :class:`Announcement`, stored under the DHT key
``polymod.module.<owner/name>`` with the host's *owner marker* as subkey — hivemind's
``[owner:<RSA public key>]``, so :class:`hivemind.dht.crypto.RSASignatureValidator`
refuses any write to that subkey not signed by the key's holder. Peers list themselves
under ``polymod.peers`` the same way (for ``polymod swarm ls``).

Expert ids derive from the module's content hash (sha256 of its ``weights.safetensors``):
``pm<first 24 hex digits>.<site index>``. They fit hivemind's expert-id grammar
``^[^.]+(\\.(0|[1-9][0-9]*))+$`` (a dotted site name such as ``layers.3.q_proj`` would
not), and a reader refuses an announcement whose ids do not match its hash, so a peer
cannot serve one module under another's id without also lying about the hash — which
the owner pin and verification sampling (:mod:`polymod.swarm.trust`) catch.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from polymod.errors import ConfigError, FormatError

FORMAT = 1
MODULE_PREFIX = "polymod.module."
PEERS_KEY = "polymod.peers"
UID_GRAMMAR = re.compile(r"^[^.]+(\.(0|[1-9][0-9]*))+$")  # hivemind.moe.expert_uid.UID_PATTERN
_HASH = re.compile(r"^[0-9a-f]{64}$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_PEER = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,80}$")  # base58 libp2p peer id


def expert_prefix(content_hash: str) -> str:
    """The expert-id prefix of a module: ``pm`` and the first 24 hex digits of its content hash."""
    if not _HASH.match(content_hash):
        raise FormatError(f"a content hash is 64 lowercase hex digits (sha256), got {content_hash!r}")
    return f"pm{content_hash[:24]}"


def expert_uid(content_hash: str, index: int) -> str:
    """The hivemind expert id of site number ``index`` of the module with ``content_hash``."""
    uid = f"{expert_prefix(content_hash)}.{int(index)}"
    if not UID_GRAMMAR.match(uid):  # cannot happen for a valid hash; hivemind asserts on it in a thread
        raise FormatError(f"expert id {uid!r} does not fit hivemind's grammar {UID_GRAMMAR.pattern}")
    return uid


def module_key(ref: str) -> str:
    """The DHT key under which hosts of ``owner/name`` announce (any version)."""
    return MODULE_PREFIX + base_ref(ref)


def base_ref(ref: str) -> str:
    """``owner/name`` of ``owner/name[@version]``.

    Raises:
        ConfigError: not an ``owner/name`` reference.
    """
    name = ref.split("@", 1)[0]
    if not _REF.match(name):
        raise ConfigError(f"a hosted module is named 'owner/name' (letters, digits, '_', '-', '.'), got {ref!r}; "
                          "give a hub reference, or --name owner/name when hosting a local directory")
    return name


@dataclass(frozen=True)
class HostedSite:
    """One site function served as an expert: Δy = f_φ(x[, y]) on rows.

    Attributes:
        name: the site's qualified name in the host.
        kind: the site kind (``linear``, ``conv1d``, ``embedding``, ``block``).
        uid: the expert id (:func:`expert_uid`).
        x_shape: per-row shape of the site input sent (``[D_in]``; ``[]`` for token ids).
        x_dtype: dtype name of the input (``float32``, ``int64``).
        out_features: D_out, the width of Δy.
        reads_output: whether the host output y is sent too (kinds whose Δy reads it).
    """

    name: str
    kind: str
    uid: str
    x_shape: list[int]
    x_dtype: str
    out_features: int
    reads_output: bool


@dataclass(frozen=True)
class Announcement:
    """A host's signed DHT record for one hosted module (see the module docstring).

    Attributes:
        ref: ``owner/name`` on the hub (or the name given to a local directory).
        version: the hub version served, or None for a local directory.
        content_hash: sha256 of the module's ``weights.safetensors``.
        peer_id: the libp2p peer id that serves the experts (base58).
        sites: the hosted site functions.
        dtype: the dtype the experts compute in.
        kind: the module kind (``lora``, ``adapter``, ...).
        license: the module card's licence, or None.
        host_fingerprint: the module card's host fingerprint (architecture, shapes, weight digests).
        public: whether the weights can be pulled (``hub`` names where).
        hub: the hub URL the weights come from, when public.
        size_bytes: size of the weights, for the pull-or-call policy.
        load: requests served per second over the last refresh period.
        time: when the record was written (the host's clock, seconds since the epoch).
    """

    ref: str
    content_hash: str
    peer_id: str
    sites: list[HostedSite]
    dtype: str
    kind: str
    version: str | None = None
    license: str | None = None
    host_fingerprint: dict[str, Any] = field(default_factory=dict)
    public: bool = False
    hub: str | None = None
    size_bytes: int = 0
    load: float = 0.0
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """The msgpack-ready value stored in the DHT."""
        out = asdict(self)
        out["format"] = FORMAT
        return out

    @classmethod
    def from_dict(cls, value: Any) -> Announcement:
        """Parse and check a DHT value; every field is checked, unknown fields refused.

        Raises:
            FormatError: a field is missing, of the wrong type, or the expert ids do not match the hash.
        """
        if not isinstance(value, dict) or value.get("format") != FORMAT:
            raise FormatError(f"not a polymod announcement of format {FORMAT}: {str(value)[:80]!r}")
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(value) - names - {"format"})
        if unknown:
            raise FormatError(f"announcement has unknown fields {unknown}")
        try:
            sites = [HostedSite(**s) for s in value["sites"]]
            record = cls(**{**{k: v for k, v in value.items() if k != "format"}, "sites": sites})
        except (KeyError, TypeError) as exc:
            raise FormatError(f"announcement is malformed ({exc})") from exc
        record.check()
        return record

    def check(self) -> None:
        """Refuse records whose fields cannot be right (see :meth:`from_dict`)."""
        base_ref(self.ref)
        prefix = expert_prefix(self.content_hash)
        if not isinstance(self.peer_id, str) or not _PEER.match(self.peer_id):
            raise FormatError(f"announcement peer id {self.peer_id!r} is not a base58 libp2p peer id")
        if not self.sites:
            raise FormatError("announcement lists no sites")
        for i, site in enumerate(self.sites):
            if site.uid != f"{prefix}.{i}":
                raise FormatError(f"expert id {site.uid!r} of site {site.name!r} does not derive from the content "
                                  f"hash {self.content_hash[:12]}… (expected {prefix}.{i}): refused")
            if not isinstance(site.out_features, int) or site.out_features < 1:
                raise FormatError(f"site {site.name!r} has out_features {site.out_features!r}")

    @property
    def site_names(self) -> list[str]:
        """The hosted sites' names, in host order."""
        return [s.name for s in self.sites]


@dataclass(frozen=True)
class PeerEntry:
    """A host's line under :data:`PEERS_KEY`: who it is and what it serves (for ``polymod swarm ls``)."""

    peer_id: str
    modules: list[str]
    load: float
    time: float

    @classmethod
    def from_dict(cls, value: Any) -> PeerEntry:
        """Parse a DHT value.

        Raises:
            FormatError: missing or ill-typed fields.
        """
        try:
            entry = cls(str(value["peer_id"]), [str(m) for m in value["modules"]], float(value["load"]),
                        float(value["time"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"peer entry is malformed ({exc})") from exc
        if not _PEER.match(entry.peer_id):
            raise FormatError(f"peer entry has a bad peer id {entry.peer_id!r}")
        return entry
