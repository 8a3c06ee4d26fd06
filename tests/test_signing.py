"""The keys derived from the cluster key (``signing.py``), alone: a sealed message opens only
with its key and the context it was sealed for, in both tag modes (HMAC-SHA256 for small
payloads, Poly1305 under a one-time key for large ones); a job's signature covers every field
and its id, and workers verify it with the public key only."""

from __future__ import annotations

import pytest

from cluster.signing import LARGE, SIGNED, TAG, Forged, Keyring


@pytest.mark.parametrize("size", [0, 100, LARGE - 1, LARGE, 3 * LARGE + 7])
def test_a_sealed_message_opens_only_as_sealed(size: int):
    sealer, other = Keyring(b"k" * 32).sealer, Keyring(b"x" * 32).sealer
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    sealed = sealer.seal(payload, "result", "job1", 7, "w1")
    assert len(sealed) == size + TAG
    assert sealer.open(sealed, "result", "job1", 7, "w1") == payload
    for context in (("result", "job2", 7, "w1"), ("result", "job1", 8, "w1"),
                    ("result", "job1", 7, "w2"), ("unit", "job1", 7, "w1")):
        with pytest.raises(Forged):
            sealer.open(sealed, *context)
    with pytest.raises(Forged):
        other.open(sealed, "result", "job1", 7, "w1")
    for at in {0, size // 2, len(sealed) - 1, len(sealed) - TAG}:
        if at < len(sealed):
            flipped = bytearray(sealed)
            flipped[at] ^= 0x40
            with pytest.raises(Forged):
                sealer.open(bytes(flipped), "result", "job1", 7, "w1")
    for cut in (sealed[:-1], sealed[1:], b"", sealed[:TAG - 1]):
        with pytest.raises(Forged):
            sealer.open(cut, "result", "job1", 7, "w1")


def test_large_messages_never_reuse_a_one_time_key():
    sealer = Keyring(b"k" * 32).sealer
    payload = bytes(LARGE)
    tags = {sealer.seal(payload, "result", "j", 0, "w")[-TAG:] for _ in range(50)}
    assert len(tags) == 50  # a fresh nonce each time


def test_a_job_signature_covers_every_field_and_the_job_id():
    keyring = Keyring(b"k" * 32)
    workers = keyring.for_workers()
    fields = {name: f"value of {name}" for name in SIGNED}
    info = {k: v.encode() for k, v in fields.items()}
    info["sig"] = keyring.sign_job({"jid": "j1", **fields}).encode()
    assert workers.job("j1", info) == fields
    assert workers.job("j2", info) is None  # copied into another job
    for name in SIGNED:
        assert workers.job("j1", {**info, name: b"tampered"}) is None, name
    assert Keyring(b"x" * 32).for_workers().job("j1", info) is None
    assert workers.job("j1", {**info, "sig": b"zz"}) is None
    assert keyring.key not in (workers.message, workers.code_public)
