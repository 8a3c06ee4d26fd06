"""The coordinator's pure decisions."""

from cluster.plan import Batcher, Tally, host_of


def test_batches_start_at_one_unit_then_follow_measured_time():
    b = Batcher(target_s=0.05, max_units=1024)
    assert b.size() == 1
    b.observe(10, 0.2)  # 20 ms per unit
    assert b.size() == 2
    b2 = Batcher(max_units=1024)
    b2.observe(100, 0.0001)
    assert b2.size() == 1024


def test_slow_units_are_never_batched_on_a_small_cluster():
    b = Batcher()
    b.observe(1, 3.0)
    assert b.size() == 1
    assert b.size(workers=64) == 1


def test_batches_grow_with_the_cluster_to_keep_the_control_plane_bounded():
    b = Batcher()  # 1,000 batches a second at most, whatever the number of workers
    b.observe(1, 1.0)  # 1 s units
    assert [b.size(workers=w) for w in (100, 1_000, 4_000, 64_000)] == [1, 1, 4, 30]
    assert 4_000 / b.size(workers=4_000) <= b.batches_per_s  # batches a second asked for
    assert b.size(workers=10**6) == 30  # batches of 30 s at most (a job's tail)
    fast = Batcher()
    fast.observe(100, 0.1)  # 1 ms units: already batched by time alone
    assert fast.size(workers=10) == fast.size(workers=50) == 50


def test_window_bounds_what_scatter_may_run_ahead():
    t = Tally(per_worker_batches=3)
    assert t.room(workers=2, batch=10) == 60
    t.scattered = 60
    assert t.room(workers=2, batch=10) == 0
    t.recorded = 25
    assert t.room(workers=2, batch=10) == 25
    assert t.room(workers=0, batch=1) == 0  # never negative


def test_only_whole_batches_are_queued():
    """A finished batch of 3 that frees room for 1 unit at a time must not let batches of 1
    through: the next batch waits until it fits whole (it did not: 48 of 103 batches held one
    unit where the batcher aimed at 3)."""
    t = Tally(per_worker_batches=3, scattered=18)
    assert t.whole_batches(workers=2, batch=3) == 0
    t.recorded = 2  # room for 2 units: no batch yet
    assert t.room(workers=2, batch=3) == 2
    assert t.whole_batches(workers=2, batch=3) == 0
    t.recorded = 3
    assert t.whole_batches(workers=2, batch=3) == 1
    t.recorded = 18
    assert t.whole_batches(workers=2, batch=3) == 6
    assert t.whole_batches(workers=2, batch=1) == 6  # single units: one batch each


def test_finished_only_when_scatter_is_exhausted_and_everything_recorded():
    t = Tally(scattered=5, recorded=4, failed=1)
    assert not t.finished
    t.exhausted = True
    assert t.finished


def test_hosts_come_from_worker_ids():
    t = Tally()
    t.by_worker.update({"a/1/cpu0.1": 3, "a/1/cpu1.1": 2, "b/9/cpu0.2": 4})
    assert t.hosts() == {"a", "b"}
    assert t.by_host() == {"a": 5, "b": 4}
    assert host_of("h/1/cpu3.1") == "h"


def test_large_results_are_not_batched():
    b = Batcher(max_bytes=1 << 20)
    b.observe(4, 0.004, 4 * 8_000_000)  # fast units, 8 MB results
    assert b.size() == 1


def test_speculation_only_at_the_tail_with_idle_workers():
    from cluster.plan import speculation_threshold_ms

    b = Batcher()
    b.observe(1, 1.0)  # one-second units
    t = Tally(scattered=10, recorded=9)
    assert speculation_threshold_ms(t, b, workers=4) is None  # scatter not done
    t.exhausted = True
    assert speculation_threshold_ms(t, b, workers=4) == 4000.0
    assert speculation_threshold_ms(t, b, workers=1) is None  # no idle worker
    fast = Batcher()
    fast.observe(100, 0.01)
    assert speculation_threshold_ms(t, fast, workers=4) == 2000.0  # never under 2 s


def test_fewer_batches_of_large_results_are_queued_ahead():
    t = Tally()
    assert t.room(workers=2, batch=1, batch_bytes=8 << 20) == 3  # 24 MB
    assert t.room(workers=2, batch=1, batch_bytes=1 << 20) == 6
    assert t.room(workers=8, batch=1, batch_bytes=8 << 20) == 9  # a batch per worker and one


def test_agents_of_a_large_cluster_renew_less_often_up_to_once_a_second():
    from cluster.settings import renewal_interval

    assert renewal_interval(0.5, 10) == renewal_interval(0.5, 500) == 0.5  # as configured
    assert renewal_interval(0.5, 800) == 0.8  # 1,000 renewals a second
    assert renewal_interval(0.5, 64_000) == 1.0  # at most
    assert renewal_interval(2.0, 64_000) == 2.0  # a slower heartbeat stays
