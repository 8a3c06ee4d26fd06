"""The Redis protocol, step by step, against a real redis-server (no workers: the test plays
them with the broker's own calls, so every interleaving is decided, none is waited for)."""

import json

import pytest

from cluster import codec
from cluster.broker import Broker, Outcome

JID, OWNER = "j1", "owner-token"


@pytest.fixture
def job(broker: Broker) -> Broker:
    broker.create_job(JID, {"name": "t", "code": b"", "sig": "", "seed": 0,
                            "max_attempts": 2, "owner": OWNER})
    for wid in ("w1", "w2"):
        broker.register_worker(wid, {"host": "h"})
    return broker


def ok(index: int, value: object) -> Outcome:
    return Outcome(index, "ok", codec.encode(value))


def recorded(broker: Broker) -> dict[int, object]:
    out = {}
    for _, fields in broker.read_results(JID, "0-0", 1000, 0) or []:
        if b"m" in fields or b"f" in fields:
            continue
        out.update({int(k): codec.decode(v) for k, v in fields.items() if k not in (b"w", b"t")})
    return out


def pending(broker: Broker) -> int:
    return broker.client.xpending(broker.keys.units, "workers")["pending"]


def test_a_batch_is_recorded_and_acknowledged_atomically(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0)), (1, codec.encode(1))]])
    work = job.read_work("w1", 0)
    assert work is not None and [i for i, _ in work.units] == [0, 1]
    assert pending(job) == 1
    assert job.record(work, "w1", 0.01, [ok(0, "a"), ok(1, "b")]) == (2, 0)
    assert pending(job) == 0
    assert job.client.xlen(job.keys.units) == 0
    assert recorded(job) == {0: "a", 1: "b"}


def test_first_result_wins_and_a_duplicate_is_counted(job: Broker):
    # two copies of unit 0 (as a speculative copy would be), taken by two workers
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(0, codec.encode(0))]])
    first, second = job.read_work("w1", 0), job.read_work("w2", 0)
    assert job.record(second, "w2", 0.0, [ok(0, "second")]) == (1, 0)
    assert job.record(first, "w1", 0.0, [ok(0, "first")]) == (0, 1)
    assert recorded(job) == {0: "second"}
    assert job.job_stats(JID)["duplicates"] == 1


def test_a_late_commit_after_reissue_is_discarded(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0)), (1, codec.encode(1))]])
    lost = job.read_work("w1", 0)
    assert job.reissue("w1", charge=False, reason="lease expired") == 2
    again = job.read_work("w2", 0)
    assert again is not None and again.attempt == 1 and len(again.units) == 2  # whole batch
    assert job.record(lost, "w1", 0.0, [ok(0, "late"), ok(1, "late")]) == (-2, 0)
    assert job.record(again, "w2", 0.0, [ok(0, "x"), ok(1, "y")]) == (2, 0)
    assert recorded(job) == {0: "x", 1: "y"}
    stats = job.job_stats(JID)
    assert stats["stale"] == 2 and stats["reissued"] == 2 and pending(job) == 0


def test_a_fresh_lease_is_not_reissued(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    job.read_work("w1", 0)
    job.renew("agent", ["w1"])
    assert job.reissue("w1", charge=False, reason="x", lease_ms=60_000) == -1
    assert pending(job) == 1
    assert job.expired_workers(60_000) == []


def test_an_expired_lease_is_found_and_a_late_renewal_refused(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    job.read_work("w1", 0)
    job.client.zadd(job.keys.workers, {"w1": 0})  # last renewed long ago
    assert job.expired_workers(1000) == ["w1"]
    assert job.reissue("w1", charge=False, reason="lost", lease_ms=1000) == 1
    _, refused, _ = job.renew("agent", ["w1", "w2"])
    assert refused == ["w1"]


def test_a_death_splits_the_batch_and_costs_an_attempt(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0)), (1, codec.encode(1)), (2, codec.encode(2))]])
    work = job.read_work("w1", 0)
    assert job.reissue("w1", charge=True, reason="worker w1 killed") == 3
    singles = [job.read_work("w2", 0) for _ in range(3)]
    assert [len(w.units) for w in singles] == [1, 1, 1]
    assert {w.attempt for w in singles} == {2}
    assert work is not None


def test_a_unit_that_keeps_killing_workers_is_recorded_as_failed(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    job.read_work("w1", 0)
    job.reissue("w1", charge=True, reason="worker w1 killed by SIGKILL")  # attempt 2 of 2
    job.register_worker("w3", {"host": "h"})
    job.read_work("w3", 0)
    job.reissue("w3", charge=True, reason="worker w3 killed by SIGKILL")
    results = job.read_results(JID, "0-0", 10, 0)
    assert len(results) == 1 and int(results[0][1][b"f"]) == 0
    assert "SIGKILL" in json.loads(results[0][1][b"e"])["error"]
    assert pending(job) == 0 and job.client.xlen(job.keys.units) == 0


def test_an_error_is_retried_then_recorded_as_failed(job: Broker):
    blob = codec.encode({"x": 1})
    job.add_units(JID, OWNER, [[(0, blob)]])
    error = json.dumps({"error": "ValueError: no", "traceback": "tb", "worker": "w1",
                        "attempts": 1}).encode()
    first = job.read_work("w1", 0)
    assert job.record(first, "w1", 0.0, [Outcome(0, "err", error, blob)]) == (0, 0)
    retry = job.read_work("w2", 0)
    assert retry.attempt == 2 and retry.units == [(0, blob)]
    job.record(retry, "w2", 0.0, [Outcome(0, "err", error, blob)])
    results = job.read_results(JID, "0-0", 10, 0)
    assert [int(f[b"f"]) for _, f in results] == [0]
    assert job.job_stats(JID) == {"retried": 1, "failed": 1}


def test_a_fenced_coordinator_cannot_add_units(job: Broker):
    import redis

    with pytest.raises(redis.ResponseError, match="FENCED"):
        job.add_units(JID, "someone-else", [[(0, codec.encode(0))]])


def test_purge_leaves_nothing_of_the_job(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(1, codec.encode(1))]])
    job.read_work("w1", 0)
    job.purge_job(JID, OWNER)
    assert job.client.xlen(job.keys.units) == 0 and pending(job) == 0
    assert not job.client.exists(*job.keys.job_keys(JID))
    assert not job.client.sismember(job.keys.jobs, JID)


def test_a_commit_for_a_purged_job_is_dropped(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    work = job.read_work("w1", 0)
    job.client.delete(job.keys.job(JID))
    assert job.record(work, "w1", 0.0, [ok(0, 1)]) == (-1, 0)
    assert pending(job) == 0


def test_large_results_travel_beside_the_script_and_duplicates_leave_no_blob(job: Broker):
    import numpy as np

    big = np.arange(100_000, dtype=np.float64)
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(0, codec.encode(0))],
                               [(1, codec.encode(1))]])
    a, b, c = job.read_work("w1", 0), job.read_work("w2", 0), job.read_work("w2", 0)
    assert job.record(a, "w1", 0.0, [ok(0, big)]) == (1, 0)
    assert job.record(b, "w2", 0.0, [ok(0, big * 2)]) == (0, 1)  # duplicate
    job.reissue("w2", charge=False, reason="lost")
    assert job.record(c, "w2", 0.0, [ok(1, big)]) == (-2, 0)  # stale
    assert job.client.hlen(job.keys.blobs(JID)) == 1  # only the recorded one is kept
    (_, fields), = job.read_results(JID, "0-0", 10, 0)
    ref = fields[b"0"]
    assert ref[:1] == b"R"
    np.testing.assert_array_equal(codec.decode(job.fetch_blobs(JID, [ref])[0]), big)
    job.purge_job(JID, OWNER)
    assert not job.client.exists(job.keys.blobs(JID))


def digest(value: object) -> bytes:
    from cluster.worker import digest as of_payload

    return of_payload(codec.encode(value))


@pytest.mark.parametrize("same", [True, False])
def test_a_differing_duplicate_is_reported_as_nondeterminism(job: Broker, same: bool):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(0, codec.encode(0))]])
    first, second = job.read_work("w1", 0), job.read_work("w2", 0)
    job.record(first, "w1", 0.0, [Outcome(0, "ok", codec.encode(1), digest=digest(1))])
    other = 1 if same else 2
    job.record(second, "w2", 0.0, [Outcome(0, "ok", codec.encode(other), digest=digest(other))])
    flagged = [int(f[b"m"]) for _, f in job.read_results(JID, "0-0", 10, 0) if b"m" in f]
    assert flagged == ([] if same else [0])
    assert job.job_stats(JID).get("mismatched", 0) == (0 if same else 1)


def test_a_stale_result_before_the_recorded_one_is_compared_too(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    lost = job.read_work("w1", 0)
    job.reissue("w1", charge=False, reason="lease expired")
    again = job.read_work("w2", 0)
    job.record(lost, "w1", 0.0, [Outcome(0, "ok", codec.encode(5), digest=digest(5))])  # stale
    job.record(again, "w2", 0.0, [Outcome(0, "ok", codec.encode(6), digest=digest(6))])
    assert job.job_stats(JID)["mismatched"] == 1
    assert recorded(job) == {0: 6}  # the stale one was not recorded
