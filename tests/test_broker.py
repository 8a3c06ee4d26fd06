"""The Redis protocol, step by step, against a real redis-server (no workers: the test plays
them with the broker's own calls, so every interleaving is decided, none is waited for)."""

import json
import threading

import pytest
from waiting import wait_for

from cluster import codec
from cluster.broker import Broker
from cluster.entries import (
    PACKED,
    Batch,
    LogRecord,
    Outcome,
    Recorded,
    Unrecorded,
    Work,
    pack_results,
    parse_result,
)
from cluster.errors import Fenced
from cluster.packing import Packer
from cluster.signing import Keyring

JID, OWNER = "j1", "owner-token"


@pytest.fixture
def job(broker: Broker) -> Broker:
    broker.create_job(JID, {"name": "t", "code": b"", "sig": "", "seed": 0,
                            "max_attempts": 2, "owner": OWNER})
    for wid, aid in (("w1", "a1"), ("w2", "a2")):  # each its own agent
        broker.register_agent(aid, {"host": "h"})
        broker.register_worker(wid, aid, {"host": "h"})
    return broker


def ok(index: int, value: object) -> Outcome:
    return Outcome(index, "ok", codec.encode(value))


def rec(broker: Broker, work: Work | None, wid: str, seconds: float, outcomes: list[Outcome]
        ) -> tuple[str, int, int]:
    assert work is not None
    answer = broker.record(work, wid, seconds, outcomes)
    return answer.status, answer.done, answer.dups


def recorded(broker: Broker) -> dict[int, object]:
    out = {}
    for _, fields in broker.read_results(JID, "0-0", 1000, 0) or []:
        if b"d" in fields or b"f" in fields:
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
    assert rec(job, work, "w1", 0.01, [ok(0, "a"), ok(1, "b")]) == ("RECORDED", 2, 0)
    assert pending(job) == 0
    assert job.client.xlen(job.keys.units) == 0
    assert recorded(job) == {0: "a", 1: "b"}


def test_an_entry_taken_from_the_stream_is_marked_started_in_the_same_call(job: Broker):
    """One round trip takes a waiting entry and marks it as the worker's running entry (a
    death is charged from then on); an entry that only arrives while the worker blocks on an
    empty stream comes unmarked (the worker marks it: ``started``)."""
    job.add_units(JID, OWNER, [[(3, codec.encode(3))]])
    before = job.client.info("commandstats")
    work = job.read_work("w1", 0)
    after = job.client.info("commandstats")
    assert work is not None and work.started
    assert job.client.hmget(job.keys.worker("w1"), "job", "unit", "entry") == [
        JID.encode(), b"3", work.msgid.encode()]
    calls = {k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"] for k in after
             if k in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_xreadgroup", "cmdstat_hset")}
    assert calls.get("cmdstat_evalsha", 0) + calls.get("cmdstat_eval", 0) == 1, calls
    assert job.read_work("w2", 1) is None  # empty: TAKE says NONE, the read finds nothing
    got: list[Work | None] = []
    reader = threading.Thread(target=lambda: got.append(job.read_work("w2", 20_000)))
    reader.start()
    wait_for(lambda: any(c["cmd"] == "xreadgroup" and "b" in c["flags"]
                         for c in job.client.client_list()), 10, "the read to block")
    job.add_units(JID, OWNER, [[(4, codec.encode(4))]])
    reader.join(20)
    assert got and got[0] is not None and not got[0].started  # ``started`` marks it


def test_first_result_wins_and_a_duplicate_is_counted(job: Broker):
    # two copies of unit 0 (as a speculative copy would be), taken by two workers
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(0, codec.encode(0))]])
    first, second = job.read_work("w1", 0), job.read_work("w2", 0)
    assert rec(job, second, "w2", 0.0, [ok(0, "second")]) == ("RECORDED", 1, 0)
    assert rec(job, first, "w1", 0.0, [ok(0, "first")]) == ("RECORDED", 0, 1)
    assert recorded(job) == {0: "second"}
    assert job.job_stats(JID)["duplicates"] == 1


def test_a_late_commit_after_reissue_is_discarded(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0)), (1, codec.encode(1))]])
    lost = job.read_work("w1", 0)
    assert job.reissue("w1", charge=False, reason="lease expired") == 2
    again = job.read_work("w2", 0)
    assert again is not None and again.attempt == 1 and len(again.units) == 2  # whole batch
    assert rec(job, lost, "w1", 0.0, [ok(0, "late"), ok(1, "late")]) == ("STALE", 0, 0)
    assert rec(job, again, "w2", 0.0, [ok(0, "x"), ok(1, "y")]) == ("RECORDED", 2, 0)
    assert recorded(job) == {0: "x", 1: "y"}
    stats = job.job_stats(JID)
    assert stats["stale"] == 2 and stats["reissued"] == 2 and pending(job) == 0


def test_a_fresh_lease_is_not_reissued(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    job.read_work("w1", 0)
    job.renew("a1", ["w1"])
    assert job.reissue("w1", charge=False, reason="x", lease_ms=60_000) == -1
    assert pending(job) == 1
    assert job.expired_workers(60_000) == []


def lapse(broker: Broker, aid: str) -> None:
    broker.client.zadd(broker.keys.leases, {aid: 0})  # its agent last renewed long ago


def test_an_expired_lease_is_found_and_a_late_renewal_refused(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    job.read_work("w1", 0)
    lapse(job, "a1")
    assert job.expired_workers(1000) == ["w1"]
    assert job.reissue("w1", charge=False, reason="lost", lease_ms=1000) == 1
    assert job.renew("a1", ["w1"]).refused == ["w1"]
    assert job.expired_workers(1000) == []  # the agent holds no lease now: it left the range
    assert job.client.zscore(job.keys.leases, "a1") is None


def test_one_renewal_holds_the_leases_of_all_an_agents_workers(job: Broker):
    job.register_worker("w3", "a1", {"host": "h"})
    job.renew("a1", ["w1", "w3"])
    assert job.live_capacity(60_000) == (3, {"a1", "a2"}, 2)
    assert job.renew("a2", ["w2"]).agents == 2  # what sets its renewal interval
    assert job.live_workers(60_000) == ["w1", "w2", "w3"]
    lapse(job, "a1")
    assert sorted(job.expired_workers(1000)) == ["w1", "w3"]
    assert job.live_workers(1000) == ["w2"] and job.live_capacity(1000)[0] == 1


def test_a_renewal_of_the_same_workers_does_not_list_them_unless_redis_asks(job: Broker):
    job.register_worker("w3", "a1", {"host": "h"})
    assert job.renew("a1", ["w1", "w3"]).refused == []
    sent = []  # the scripts called

    def spy(name: str) -> None:
        script = getattr(job, name)
        setattr(job, name, lambda keys, args: sent.append(name) or script(keys=keys, args=args))

    spy("_renew")
    spy("_renew_same")
    assert job.renew("a1", ["w1", "w3"], "0", same=True).refused == []
    assert sent == ["_renew_same"]  # one call, no worker named
    job.create_job("j2", {"name": "t", "code": b"", "sig": "", "seed": 0, "max_attempts": 2,
                          "owner": OWNER})
    job.purge_job("j2", OWNER)  # a job ended: Redis asks for the list, to look at the workers
    assert job.renew("a1", ["w1", "w3"], "0", same=True).ended == "1"
    assert sent == ["_renew_same", "_renew_same", "_renew"]
    lapse(job, "a1")
    assert job.reissue("w3", charge=False, reason="lost", lease_ms=1000) == 0
    job.renew("a1", ["w1"])  # (a renewal of w1 alone: w3 is not its agent's any more)
    assert job.expired_workers(1000) == []
    # the agent still runs w3 and believes nothing changed: Redis asks for the list
    assert job.renew("a1", ["w1", "w3"], "0", same=True).refused == ["w3"]


def test_a_worker_its_agent_renews_no_more_keeps_its_own_lease_until_it_lapses(job: Broker):
    job.register_worker("w3", "a1", {"host": "h"})
    job.renew("a1", ["w1", "w3"])
    job.renew("a1", ["w1"])  # w3 stopped (SIGSTOP) or exited: not renewed from now on
    assert job.expired_workers(60_000) == []  # its last renewal is recent
    assert job.live_workers(60_000) == ["w1", "w2", "w3"]
    assert job.renew("a1", ["w1", "w3"]).refused == []  # listed again in time: its agent's again
    assert job.client.zscore(job.keys.orphans, "w3") is None
    job.renew("a1", ["w1"])
    job.client.zadd(job.keys.orphans, {"w3": 0})  # ... and now long ago
    assert job.expired_workers(1000) == ["w3"]
    assert job.reissue("w3", charge=False, reason="lost", lease_ms=1000) == 0
    assert job.renew("a1", ["w1", "w3"]).refused == ["w3"]  # too late
    assert job.live_workers(60_000) == ["w1", "w2"]


def test_a_retired_agents_workers_keep_its_last_renewal_as_their_own_lease(job: Broker):
    job.renew("a1", ["w1"])
    renewed = job.client.zscore(job.keys.leases, "a1")
    job.unregister_agent("a1")  # `up` replaced it: its host lost power
    assert job.client.zscore(job.keys.orphans, "w1") == renewed
    assert job.client.zscore(job.keys.leases, "a1") is None
    assert job.expired_workers(60_000) == []
    job.client.zadd(job.keys.orphans, {"w1": 0})
    assert job.expired_workers(1000) == ["w1"]


def test_renewals_look_for_workers_of_an_ended_job_only_when_a_job_ended(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    job.started("w1", job.read_work("w1", 0))
    first = job.renew("a1", ["w1"])  # "": look now
    assert first.abandoned == [] and first.ended == "0"
    job.purge_job(JID, OWNER)
    seen = job.renew("a1", ["w1"], first.ended)
    assert seen.abandoned == ["w1"] and seen.ended == "1"
    assert job.renew("a1", ["w1"], seen.ended).abandoned == []  # nothing ended since
    assert job.renew("a1", ["w1"]).abandoned == ["w1"]  # an agent's periodic look
    job.purge_job(JID, OWNER)  # a retried purge: the job was gone already, nothing counted
    assert job.renew("a1", ["w1"], seen.ended).abandoned == []


def test_the_lease_check_finds_lapsed_leases_by_range_and_leaseless_consumers_by_scan(
        job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(1, codec.encode(1))]])
    job.read_work("w1", 0)
    job.register_worker("w3", "a3", {"host": "h"})
    job.read_work("w3", 0)
    lapse(job, "a1")
    job.client.zrem(job.keys.workers, "w3")  # no lease at all (as after `cluster down`)
    job.client.zrem(job.keys.agent_workers("a3"), "w3")
    for n in range(5):  # long dead, never a consumer: found too, and cleaned by its reissue
        job.client.zadd(job.keys.orphans, {f"old{n}": 1})
    assert sorted(job.expired_workers(1000, full=False)) == ["old0", "old1", "old2", "old3",
                                                             "old4", "w1"]
    assert "w3" in job.expired_workers(1000, full=True)
    assert len(job.expired_workers(1000, full=True, most=2)) == 2  # bounded
    for wid in job.expired_workers(1000, full=True):
        job.reissue(wid, charge=False, reason="lost", lease_ms=1000)
    assert job.expired_workers(1000, full=True) == []
    assert job.client.xlen(job.keys.units) == 2 and pending(job) == 0  # both queued again


def test_a_death_splits_the_batch_and_costs_an_attempt(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0)), (1, codec.encode(1)), (2, codec.encode(2))]])
    work = job.read_work("w1", 0)
    assert work is not None
    job.started("w1", work)
    assert job.reissue("w1", charge=True, reason="worker w1 killed") == 3
    singles = [job.read_work("w2", 0) for _ in range(3)]
    assert [len(w.units) for w in singles] == [1, 1, 1]
    assert {w.attempt for w in singles} == {2}


def test_a_death_is_not_charged_to_an_entry_never_started(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0)), (1, codec.encode(1))],
                               [(2, codec.encode(2))]])
    running, unstarted = job.read_work("w1", 0), job.read_work("w1", 0)
    assert running is not None and unstarted is not None
    job.started("w1", running)
    assert job.reissue("w1", charge=True, reason="worker w1 killed") == 3
    again = [job.read_work("w2", 0) for _ in range(3)]
    attempts = {u[0]: w.attempt for w in again if w is not None for u in w.units}
    assert attempts == {0: 2, 1: 2, 2: 1}  # the entry it never started costs nothing


def test_a_unit_that_keeps_killing_workers_is_queued_once_more_to_fail(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    job.started("w1", job.read_work("w1", 0))
    job.reissue("w1", charge=True, reason="worker w1 killed by SIGKILL")  # attempt 2 of 2
    job.register_worker("w3", "a3", {"host": "h"})
    job.started("w3", job.read_work("w3", 0))
    job.reissue("w3", charge=True, reason="worker w3 killed by SIGKILL")
    assert job.read_results(JID, "0-0", 10, None) == []  # a script cannot sign a failure:
    last = job.read_work("w2", 0)  # a worker records it, without computing it
    assert last is not None and (last.attempt, last.reason) == (3, "worker w3 killed by SIGKILL")
    assert [i for i, _ in last.units] == [0]
    error = json.dumps({"error": "its worker died"}).encode()
    assert rec(job, last, "w2", 0.0, [Outcome(0, "fatal", error)]) == ("RECORDED", 0, 0)
    results = job.read_results(JID, "0-0", 10, 0)
    assert len(results) == 1 and int(results[0][1][b"f"]) == 0
    assert pending(job) == 0 and job.client.xlen(job.keys.units) == 0


def test_an_error_is_retried_then_recorded_as_failed(job: Broker):
    blob = codec.encode({"x": 1})
    job.add_units(JID, OWNER, [[(0, blob)]])
    error = json.dumps({"error": "ValueError: no", "traceback": "tb", "worker": "w1",
                        "attempts": 1}).encode()
    first = job.read_work("w1", 0)
    assert rec(job, first, "w1", 0.0, [Outcome(0, "err", error, blob)]) == ("RECORDED", 0, 0)
    retry = job.read_work("w2", 0)
    assert retry.attempt == 2 and retry.units == [(0, blob)]
    rec(job, retry, "w2", 0.0, [Outcome(0, "err", error, blob)])
    results = job.read_results(JID, "0-0", 10, 0)
    assert [int(f[b"f"]) for _, f in results] == [0]
    assert job.job_stats(JID) == {"retried": 1, "failed": 1}


def packed(indices: list[int]) -> Batch:
    """A packed batch as the coordinator makes it (``Packer``) of units equal to their index."""
    sealer = Keyring(b"k" * 32).sealer
    packer = Packer(sealer, 1 << 20, lambda i, u: sealer.seal(codec.encode(u), "unit", JID, i))
    batch, left = packer.batch(JID, [(i, i) for i in indices])
    assert batch.packed and left == []
    return batch


def test_a_death_queues_a_packed_entry_once_to_be_split_by_a_worker(job: Broker):
    job.add_units(JID, OWNER, [packed([0, 1, 2, 3])])
    assert int(job.client.hget(job.keys.job(JID), "scattered")) == 4
    work = job.read_work("w1", 0)
    assert work is not None and work.packed and [i for i, _ in work.units] == [0, 1, 2, 3]
    job.add_units(JID, OWNER, [[(1, codec.encode(1))]])
    rec(job, job.read_work("w2", 0), "w2", 0.0, [ok(1, "b")])  # unit 1 recorded elsewhere
    assert job.reissue("w1", charge=True, reason="worker w1 killed") == 3
    split = job.read_work("w2", 0)
    assert split is not None and split.split and split.attempt == 2
    assert split.packed == work.packed and [i for i, _ in split.units] == [0, 2, 3]
    # taking an entry to split does not mark it started: a death while splitting is free
    assert job.client.hget(job.keys.worker("w2"), "entry") is None
    singles = [(i, codec.encode(i)) for i in (0, 2, 3)]
    assert job.split(split, "w2", singles) == 3
    assert job.split(split, "w2", singles) == 0  # a retry after a lost reply: already done
    again = [job.read_work("w1", 0) for _ in range(3)]
    assert [(w.units, w.attempt, w.packed, w.split) for w in again if w] == [
        ([u], 2, b"", False) for u in singles]
    assert job.client.xlen(job.keys.units) == 3 and pending(job) == 3


def test_an_uncharged_packed_entry_is_queued_again_packed(job: Broker):
    job.add_units(JID, OWNER, [packed([0, 1, 2])])
    work = job.read_work("w1", 0)
    assert job.reissue("w1", charge=False, reason="lease lost") == 3
    again = job.read_work("w2", 0)
    assert again is not None and (again.attempt, again.split) == (1, False)
    assert again.packed == work.packed and again.units == work.units


def test_a_packed_entry_past_its_last_attempt_is_queued_to_fail_not_to_split(job: Broker):
    job.client.hset(job.keys.job(JID), "max_attempts", 1)
    job.add_units(JID, OWNER, [packed([0, 1])])
    job.started("w1", job.read_work("w1", 0))
    job.reissue("w1", charge=True, reason="worker w1 killed")
    last = job.read_work("w2", 0)
    assert last is not None and (last.attempt, last.reason, last.split) == (
        2, "worker w1 killed", False)
    assert last.packed and [i for i, _ in last.units] == [0, 1]


def test_a_packed_entry_of_one_unit_left_is_computed_not_split_and_a_death_charged(
        job: Broker):
    job.add_units(JID, OWNER, [packed([0, 1])])
    work = job.read_work("w1", 0)
    job.add_units(JID, OWNER, [[(1, codec.encode(1))]])
    rec(job, job.read_work("w2", 0), "w2", 0.0, [ok(1, "b")])
    job.started("w1", work)
    job.reissue("w1", charge=True, reason="worker w1 killed")
    again = job.read_work("w2", 0)
    assert again is not None and (again.attempt, again.split, again.started) == (2, False, True)
    assert [i for i, _ in again.units] == [0]
    assert job.client.hget(job.keys.worker("w2"), "entry") == again.msgid.encode()


def test_a_speculative_copy_of_a_packed_entry_keeps_its_units_not_yet_recorded(job: Broker):
    job.add_units(JID, OWNER, [packed([0, 1, 2])])
    work = job.read_work("w1", 0)
    job.add_units(JID, OWNER, [[(2, codec.encode(2))]])
    rec(job, job.read_work("w2", 0), "w2", 0.0, [ok(2, "c")])
    assert job.copy_entry(JID, OWNER, work.msgid) == 2
    copy = job.read_work("w2", 0)
    assert copy is not None and copy.packed == work.packed
    assert [i for i, _ in copy.units] == [0, 1]


def test_small_results_of_a_commit_are_packed_and_a_duplicate_compared_from_the_pack(
        job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0)), (1, codec.encode(1))],
                               [(1, codec.encode(1))]])
    first, second = job.read_work("w1", 0), job.read_work("w2", 0)
    results = [(i, codec.digest(codec.encode(v)), codec.encode(v)) for i, v in ((0, "a"),
                                                                              (1, "b"))]
    sealed = SEALER.seal(pack_results(results), "results", JID, "w1")
    packed_outcomes = [Outcome(i, "ok", PACKED) for i in (0, 1)]
    assert job.record(first, "w1", 0.01, packed_outcomes, packed=sealed).status == "RECORDED"
    dup = SEALER.seal(pack_results([(1, digest(9), codec.encode(9))]), "results", JID, "w2")
    assert job.record(second, "w2", 0.01, [Outcome(1, "ok", PACKED)], packed=dup).done == 0
    entries = [parse_result(f, SEALER, JID) for _, f in job.read_results(JID, "0-0", 10, 0)]
    assert entries[0] == Recorded("w1", 0.01, 2, [(0, PACKED), (1, PACKED)], sealed)
    assert entries[1] == Unrecorded("w2", [(1, digest(9))])
    # a pack that does not verify (another key, another worker) gives no digest
    other = Keyring(b"x" * 32).sealer.seal(pack_results(results), "results", JID, "w2")
    fields = {b"d": b"w2", b"p": other, b"1": PACKED}
    assert parse_result(fields, SEALER, JID) == Unrecorded("w2", [], 1)


def test_a_fenced_coordinator_cannot_add_units(job: Broker):
    with pytest.raises(Fenced, match="taken over"):
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
    assert rec(job, work, "w1", 0.0, [ok(0, 1)]) == ("GONE", 0, 0)
    assert pending(job) == 0


def test_large_results_travel_beside_the_script_and_duplicates_leave_no_blob(job: Broker):
    import numpy as np

    big = np.arange(100_000, dtype=np.float64)
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(0, codec.encode(0))],
                               [(1, codec.encode(1))]])
    a, b, c = job.read_work("w1", 0), job.read_work("w2", 0), job.read_work("w2", 0)
    assert rec(job, a, "w1", 0.0, [ok(0, big)]) == ("RECORDED", 1, 0)
    assert rec(job, b, "w2", 0.0, [ok(0, big * 2)]) == ("RECORDED", 0, 1)  # duplicate
    job.reissue("w2", charge=False, reason="lost")
    assert rec(job, c, "w2", 0.0, [ok(1, big)]) == ("STALE", 0, 0)  # stale
    assert job.client.hlen(job.keys.blobs(JID)) == 1  # only the recorded one is kept
    (_, fields), = job.read_results(JID, "0-0", 10, 0)
    ref = fields[b"0"]
    assert ref[:1] == b"R"
    np.testing.assert_array_equal(codec.decode(job.fetch_blobs(JID, [ref])[0]), big)
    job.purge_job(JID, OWNER)
    assert not job.client.exists(job.keys.blobs(JID))


def digest(value: object) -> bytes:
    return codec.digest(codec.encode(value))


SEALER = Keyring(b"k" * 32).sealer


def signed_digest(value: object, wid: str) -> bytes:
    """What a worker sends: the digest of its result, signed (``Worker.sealed``)."""
    return SEALER.seal(digest(value), "digest", JID, 0, wid)


def unrecorded(broker: Broker) -> list[Unrecorded]:
    entries = [parse_result(f, SEALER, JID) for _, f in broker.read_results(JID, "0-0", 10, 0)]
    return [e for e in entries if isinstance(e, Unrecorded)]


def test_a_duplicate_leaves_its_digest_for_the_coordinator_to_compare(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(0, codec.encode(0))]])
    first, second = job.read_work("w1", 0), job.read_work("w2", 0)
    rec(job, first, "w1", 0.0,
        [Outcome(0, "ok", codec.encode(1), digest=signed_digest(1, "w1"))])
    rec(job, second, "w2", 0.0,
        [Outcome(0, "ok", codec.encode(2), digest=signed_digest(2, "w2"))])
    assert unrecorded(job) == [Unrecorded("w2", [(0, digest(2))])]
    assert not job.client.keys(f"{job.keys.prefix}job:{JID}:digests")  # nothing per unit kept


def test_a_stale_result_leaves_its_digest_too(job: Broker):
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    lost = job.read_work("w1", 0)
    job.reissue("w1", charge=False, reason="lease expired")
    again = job.read_work("w2", 0)
    rec(job, lost, "w1", 0.0,
        [Outcome(0, "ok", codec.encode(5), digest=signed_digest(5, "w1"))])  # stale
    rec(job, again, "w2", 0.0,
        [Outcome(0, "ok", codec.encode(6), digest=signed_digest(6, "w2"))])
    assert unrecorded(job) == [Unrecorded("w1", [(0, digest(5))])]
    assert recorded(job) == {0: 6}  # the stale one was not recorded


def test_a_retried_commit_that_went_through_is_recognised(job: Broker):
    """The reply to RECORD was lost and the worker commits again: AGAIN, nothing of the first
    commit is deleted, nothing is counted, and the large result is still there."""
    import numpy as np

    big = np.arange(50_000, dtype=np.float64)
    job.add_units(JID, OWNER, [[(0, codec.encode(0)), (1, codec.encode(1))]])
    work = job.read_work("w1", 0)
    outcomes = [ok(0, big), ok(1, "small")]
    assert rec(job, work, "w1", 0.0, outcomes) == ("RECORDED", 2, 0)
    assert rec(job, work, "w1", 0.0, outcomes) == ("AGAIN", 0, 0)
    (_, fields), = job.read_results(JID, "0-0", 10, 0)
    blob, = job.fetch_blobs(JID, [fields[b"0"]])
    np.testing.assert_array_equal(codec.decode(blob), big)
    assert job.client.hlen(job.keys.blobs(JID)) == 1  # the retry's own copy is gone
    stats = job.job_stats(JID)
    assert stats["recorded"] == 2 and "duplicates" not in stats and "stale" not in stats


def test_gathered_results_leave_redis(job: Broker):
    import numpy as np

    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(1, codec.encode(1))]])
    first, second = job.read_work("w1", 0), job.read_work("w2", 0)
    rec(job, first, "w1", 0.0, [ok(0, np.zeros(10_000))])
    rec(job, second, "w2", 0.0, [ok(1, "x")])
    entries = job.read_results(JID, "0-0", 10, 0)
    job.consume(JID, OWNER, entries[0][0], [entries[0][1][b"0"][1:]])
    assert job.client.hlen(job.keys.blobs(JID)) == 0
    assert [mid for mid, _ in job.read_results(JID, "0-0", 10, 0)] == [entries[1][0]]
    job.consume(JID, OWNER, entries[0][0], [entries[0][1][b"0"][1:]])  # again: no harm
    with pytest.raises(Fenced):
        job.consume(JID, "someone-else", entries[1][0], [])
    assert job.client.xlen(job.keys.results(JID)) == 1


def test_a_takeover_sees_what_was_recorded_and_can_reclaim_lost_results(job: Broker):
    job.add_units(JID, OWNER, [[(i, codec.encode(i)) for i in range(10)]])
    work = job.read_work("w1", 0)
    rec(job, work, "w1", 0.0, [ok(i, i) for i in range(10)])
    (mid, _), = job.read_results(JID, "0-0", 10, 0)
    job.consume(JID, OWNER, mid, [])  # the old coordinator gathered them all, then died
    snapshot = job.take_over(JID, "new-owner")
    assert snapshot is not None and snapshot.last_result == "0-0"
    assert snapshot.recorded == b"\xff\xc0"  # units 0-9
    with pytest.raises(Fenced):
        job.add_units(JID, OWNER, [[(10, codec.encode(10))]])
    job.reclaim(JID, "new-owner", b"\x81")  # units 0 and 7 are to be recorded again
    assert job.client.get(job.keys.recorded(JID)) == b"\x7e\xc0"
    assert job.take_over("no-such-job", "x") is None


def test_keys_made_after_the_last_expiry_refresh_expire_with_the_job(job: Broker):
    import numpy as np

    job.expire_job(JID, 3600)
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(1, codec.encode(1))]])
    first, second = job.read_work("w1", 0), job.read_work("w2", 0)
    rec(job, first, "w1", 0.0, [Outcome(0, "ok", codec.encode(np.zeros(10_000)),
                                        digest=digest(1))])
    job.reissue("w2", charge=False, reason="lost")
    rec(job, second, "w2", 0.0, [ok(1, 1)])  # stale
    said = LogRecord(0, 1, "w1", 0.0, "ok", {"stdout": "hi\n"}).to_json()
    job._log(keys=[job.keys.job(JID), job.keys.stats(JID), job.keys.logs(JID)], args=[99, said])
    made = [k for k in job.keys.job_keys(JID)  # workdir comes with the job, final with its end
            if k not in (job.keys.workdir(JID), job.keys.final(JID))]
    for key in [*made, job.keys.logs(JID)]:
        assert job.client.exists(key), key
        assert 0 < job.client.ttl(key) <= 3600, key


@pytest.fixture
def small_redis(tmp_path) -> Broker:
    """A private redis-server whose memory limit a test may lower."""
    import subprocess

    from conftest import need

    from cluster.local import free_port

    port = free_port()
    proc = subprocess.Popen([need("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        broker = None
        for _ in range(200):
            try:
                broker = Broker.connect(f"redis://127.0.0.1:{port}/0")
                break
            except Exception:  # noqa: BLE001 - not up yet
                import time

                time.sleep(0.02)
        assert broker is not None
        yield broker
        broker.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_commit_refused_for_lack_of_memory_records_nothing(small_redis: Broker):
    import numpy as np

    from cluster.errors import RedisFull

    job = small_redis
    job.create_job(JID, {"name": "t", "code": b"", "sig": "", "seed": 0, "max_attempts": 2,
                         "owner": OWNER})
    job.register_worker("w1", "a1", {"host": "h"})
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    work = job.read_work("w1", 0)
    used, _ = job.memory()
    job.client.config_set("maxmemory", used + 256 * 1024)
    outcomes = [ok(0, np.zeros(1 << 20 // 8 * 8))]  # 8 MB: does not fit
    with pytest.raises(RedisFull, match="out of memory"):
        job.record(work, "w1", 0.0, outcomes)
    assert not job.client.getbit(job.keys.recorded(JID), 0)
    assert pending(job) == 1 and job.client.hlen(job.keys.blobs(JID)) == 0
    job.client.config_set("maxmemory", 0)
    assert rec(job, work, "w1", 0.0, outcomes) == ("RECORDED", 1, 0)


def script_exists_calls(broker: Broker) -> int:
    stats = broker.client.info("commandstats")
    return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))


def test_a_batch_costs_no_script_exists_round_trip(job: Broker):
    """Queueing and recording call the scripts by their SHA alone (redis-py would ask
    SCRIPT EXISTS before every pipeline that runs one)."""
    before = script_exists_calls(job)
    job.add_units(JID, OWNER, [[(0, codec.encode(0))], [(1, codec.encode(1))]])
    assert rec(job, job.read_work("w1", 0), "w1", 0.0, [ok(0, 0)]) == ("RECORDED", 1, 0)
    assert script_exists_calls(job) == before


def test_scripts_lost_by_redis_are_loaded_again(job: Broker):
    """After SCRIPT FLUSH (as after a restart), the same calls load the scripts and go on:
    the batch is queued once and recorded once, with its large result."""
    job.client.script_flush()
    job.add_units(JID, OWNER, [[(0, codec.encode(0))]])
    assert job.client.xlen(job.keys.units) == 1
    job.client.script_flush()
    big = "x" * 100_000  # a blob: HSET beside the script, in the same transaction
    assert rec(job, job.read_work("w1", 0), "w1", 0.0, [ok(0, big)]) == ("RECORDED", 1, 0)
    [(_, fields)] = job.read_results(JID, "0-0", 10, 0)
    assert job.client.hlen(job.keys.blobs(JID)) == 1
    assert fields[b"0"][:1] == b"R"
