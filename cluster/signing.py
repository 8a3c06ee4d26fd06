"""Who may write what through Redis: everything a worker or a coordinator acts on is signed
with keys derived from the cluster key, so the Redis password alone lets no one forge a result,
a unit or a job.

Two keys come from the cluster key (``Keyring``), and the cluster key itself never leaves the
coordinator and the agents:

- the **code key**, an Ed25519 key pair: a coordinator signs its job's description (job id,
  code, seed, params, limits, the job directory's digest, an expiry in Redis server time) with
  the private half; workers hold only the public half, so code running in a worker can verify
  jobs but not make one.
- the **message key**: units (job id and unit index), results (job id, unit index, worker),
  failures and the digests of duplicate results carry a tag under it (keyed BLAKE2b, or for
  a payload of 64 KB or more Poly1305 under a one-time key: ``Sealer``). Workers hold it
  (they sign results), so job code can read it too: see the README's security model.

A sealed message is ``payload || tag`` (a trailer, so a payload keeps its first byte: the
codec's format, or ``R`` for a reference to a large result); the tag covers the context (what
the message claims to be, as a JSON list) and the payload. ``open`` returns the payload or
raises ``Forged``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.poly1305 import Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import ClusterError

TAG = 32
LARGE = 1 << 16  # from this payload size on: Poly1305 (``Sealer``)
NONCE = 16


class Forged(ClusterError):
    """A message whose tag or signature does not verify: forged, tampered with, replayed into
    another job or unit, or signed with another cluster's key."""


def _context(parts: tuple[Any, ...]) -> bytes:
    """What a message claims to be, as the bytes its tag covers before the payload: its length,
    then the parts joined by NUL (each kind has a fixed number of parts, and those of a genuine
    message hold no NUL: job ids are hex, indices numbers, worker ids made by agents)."""
    text = "\x00".join([p if isinstance(p, str) else str(p) for p in parts]).encode()
    return len(text).to_bytes(4, "big") + text


class Sealer:
    """Tags messages with the message key, and checks their tags. Below ``LARGE`` bytes the
    tag is keyed BLAKE2b (a MAC by design; three times as fast as HMAC-SHA256 on small
    messages); from ``LARGE`` on, Poly1305 under a one-time key (HMAC-SHA256 of the context
    and a random nonce, which goes with the tag), about 8 times as fast as HMAC-SHA256 on
    large arrays. Each mode has a key of its own, derived from the message key."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._small = hmac.digest(key, b"blake2b tags", "sha256")
        self._small_base = hashlib.blake2b(key=self._small, digest_size=TAG)  # copied per tag
        self._large = hmac.digest(key, b"poly1305 one-time keys", "sha256")

    def __repr__(self) -> str:
        return "Sealer(...)"

    def tag(self, payload: bytes | memoryview, context: tuple[Any, ...]) -> bytes:
        ctx = _context(context)
        if len(payload) < LARGE:
            return self._small_tag(ctx, payload)
        nonce = os.urandom(NONCE)
        return nonce + Poly1305.generate_tag(self._one_time(ctx, nonce), payload)

    def _small_tag(self, ctx: bytes, payload: bytes | memoryview) -> bytes:
        mac = self._small_base.copy()
        mac.update(ctx)
        mac.update(payload)
        return mac.digest()

    def _one_time(self, ctx: bytes, nonce: bytes) -> bytes:
        """A Poly1305 key for one message: never used twice (a fresh nonce), never seen."""
        return hmac.digest(self._large, ctx + nonce, "sha256")

    def seal(self, payload: bytes, *context: Any) -> bytes:
        return payload + self.tag(payload, context)

    def open(self, sealed: bytes | bytearray | mmap.mmap, *context: Any) -> Any:
        """The payload of a message sealed with this context; ``Forged`` if it was not. A
        ``bytearray`` or ``mmap`` (a large result just received) gives a view of it, not a
        copy."""
        if len(sealed) < TAG or not self._verifies(sealed, _context(context)):
            raise Forged(f"{context[0] if context else 'message'} not signed by this cluster's "
                         "key")
        if not isinstance(sealed, bytes):  # a bytearray or a mapped file: ours alone
            return memoryview(sealed)[:-TAG]
        return sealed[:-TAG]

    def _verifies(self, sealed: bytes | bytearray | mmap.mmap, ctx: bytes) -> bool:
        payload, trailer = memoryview(sealed)[:-TAG], bytes(sealed[-TAG:])
        if len(payload) < LARGE:
            return hmac.compare_digest(trailer, self._small_tag(ctx, payload))
        try:
            Poly1305.verify_tag(self._one_time(ctx, trailer[:NONCE]), payload, trailer[NONCE:])
        except InvalidSignature:
            return False
        return True


SIGNED = ("name", "path", "code", "seed", "params", "max_attempts", "max_result",
          "redis_grace", "max_log", "workdir_sha", "workdir_job", "expires")
"""The job hash's fields that its signature covers (with the job id): all that workers act on,
and an expiry (Redis server ms; the coordinator signs anew as it keeps the job)."""


def description_bytes(fields: dict[str, Any]) -> bytes:
    """The canonical form of a job's description, as signed."""
    return json.dumps({k: str(v) for k, v in fields.items()}, sort_keys=True,
                      separators=(",", ":")).encode()


def code_bytes(jid: str, blob: bytes) -> bytes:
    """What a pickle's signature covers: a job description (JSON, ``{...}``) never reads so."""
    return b"cluster pickle v1\x00" + jid.encode() + b"\x00" + blob


@dataclass(frozen=True)
class WorkerKeys:
    """What a worker holds: the message key and the public half of the code key."""

    message: bytes
    code_public: bytes

    @property
    def sealer(self) -> Sealer:
        return Sealer(self.message)

    def verify_job(self, fields: dict[str, Any], signature: bytes | str) -> bool:
        try:
            sig = bytes.fromhex(signature.decode() if isinstance(signature, bytes) else signature)
            Ed25519PublicKey.from_public_bytes(self.code_public).verify(
                sig, description_bytes(fields))
        except (ValueError, UnicodeDecodeError, InvalidSignature):
            return False
        return True

    def verify_code(self, jid: str, blob: bytes, signature: bytes) -> bool:
        """A pickle signed for job ``jid`` with the cluster's code key (``Keyring.sign_code``)."""
        try:
            Ed25519PublicKey.from_public_bytes(self.code_public).verify(
                signature, code_bytes(jid, blob))
        except (ValueError, InvalidSignature):
            return False
        return True

    def job(self, jid: str, info: dict[str, bytes]) -> dict[str, str] | None:
        """A job hash's signed fields, or None when its signature does not cover them
        (forged, tampered with, copied from another job, or another cluster's key)."""
        fields = {k: info.get(k, b"").decode("utf-8", "replace") for k in SIGNED}
        return fields if self.verify_job({"jid": jid, **fields}, info.get("sig", b"")) else None

    def to_json(self) -> dict[str, str]:
        return {"message": self.message.hex(), "code_public": self.code_public.hex()}

    def fingerprint(self) -> str:
        """What an agent reports: coordinators compare it with their own keys' (no secret)."""
        return fingerprint(self.message + self.code_public)

    @classmethod
    def from_json(cls, data: dict[str, str]) -> WorkerKeys:
        return cls(bytes.fromhex(data["message"]), bytes.fromhex(data["code_public"]))


@dataclass(frozen=True)
class Keyring:
    """The keys derived from one cluster key."""

    key: bytes

    def derive(self, purpose: str) -> bytes:
        return hmac.new(self.key, f"cluster {purpose} v1".encode(), hashlib.sha256).digest()

    @property
    def sealer(self) -> Sealer:
        return Sealer(self.derive("message key"))

    def _code_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.derive("code signing key"))

    def sign_job(self, fields: dict[str, Any]) -> str:
        return self._code_key().sign(description_bytes(fields)).hex()

    def sign_code(self, jid: str, blob: bytes) -> bytes:
        """Sign a pickle (a function, arguments) for job ``jid``: workers load only these."""
        return self._code_key().sign(code_bytes(jid, blob))

    def for_workers(self) -> WorkerKeys:
        public = self._code_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return WorkerKeys(self.derive("message key"), public)


def fingerprint(key: bytes) -> str:
    """A short public name for a key: agents and coordinators compare these, never keys (the
    same as ``codec.fingerprint``; here so that an agent needs no numpy)."""
    return hmac.new(key, b"cluster key fingerprint", hashlib.sha256).hexdigest()[:16]
