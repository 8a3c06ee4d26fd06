"""``cluster.Executor`` against ``concurrent.futures``' own contract: the executor tests of
CPython's test_concurrent_futures (submit, map order and timeout, exceptions and their remote
traceback, as_completed, wait, shutdown with and without cancel_futures), ported to a cluster
Executor on a real local cluster; the same program run with ProcessPoolExecutor gives the same
results, also with a worker SIGKILLed mid-map; a tampered pickle is never loaded."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import SAMPLES
from waiting import wait_for

import cluster
from cluster.executor import BrokenCluster, Executor, RemoteTraceback, TaskFailed
from cluster.signing import Keyring

sys.path.insert(0, str(SAMPLES))
import calls  # noqa: E402  (tests/jobs/calls.py: shipped to the workers with its directory)


@pytest.fixture(scope="module")
def executor(local_cluster: Path) -> Iterator[Executor]:
    with Executor(credentials=str(local_cluster), directory=SAMPLES) as ex:
        yield ex


# -- submit and results (CPython: ExecutorTest, FutureTests) ----------------------------------


def test_submit(executor: Executor):
    future = executor.submit(pow, 2, 8)
    assert future.result(timeout=60) == 256


def test_submit_keyword(executor: Executor):
    future = executor.submit(calls.mul, 2, y=8)
    assert future.result(timeout=60) == 16
    future = executor.submit(calls.mul, x=2, y=8)
    assert future.result(timeout=60) == 16
    with pytest.raises(TypeError):
        executor.submit(fn=calls.mul, x=2, y=8)  # fn is positional-only


def test_map(executor: Executor):
    assert list(executor.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10), chunksize=3)) == list(
        map(pow, range(10), range(10)))


def test_map_exception(executor: Executor):
    results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout(executor: Executor, tmp_path: Path):
    gate = tmp_path / "gate"
    results = []
    try:
        with pytest.raises(TimeoutError):
            for value in executor.map(calls.gated, [None, None, str(gate)], timeout=5):
                results.append(value)
    finally:
        gate.touch()
    assert results == [None, None]


def test_map_consumes_its_input_lazily(executor: Executor, monkeypatch: pytest.MonkeyPatch):
    """With at most IN_FLIGHT calls ahead: an endless input is no problem."""
    monkeypatch.setattr("cluster.executor.IN_FLIGHT", 8)
    taken = 0

    def naturals() -> Iterator[int]:
        nonlocal taken
        while True:
            taken += 1
            yield taken - 1

    results = executor.map(calls.power, naturals())
    assert [next(results) for _ in range(20)] == [i * i for i in range(20)]
    assert taken <= 20 + 8 + 1
    results.close()


def test_values_come_back_as_they_went(executor: Executor):
    values = [(1, 2), {1: "a", (2, 3): {4, 5}}, frozenset({1}), b"\x00bytes", 2 ** 100, 1.5,
              float("inf"), None, True, [(1,), [2]], {"\x00t": 1}, np.arange(6).reshape(2, 3),
              np.float32(2.5), complex(1, 2), Path("/x")]
    for value, back in zip(values, executor.map(lambda v: v, values), strict=True):
        assert type(back) is type(value), (value, back)
        if isinstance(value, np.ndarray):
            assert back.dtype == value.dtype and (back == value).all()
        else:
            assert back == value


def test_lambdas_and_closures_travel_by_value(executor: Executor):
    offset = 100

    def shifted(x: int) -> int:
        return x + offset

    assert executor.submit(shifted, 1).result(60) == 101
    assert list(executor.map(lambda x: -x, [1, 2])) == [-1, -2]


def test_unit_rng_in_a_call_depends_on_its_submission_only(executor: Executor):
    first = executor.submit(calls.drawn, 5).result(60)
    assert first.shape == (5,)
    again = list(executor.map(calls.drawn, [5, 5, 5]))
    assert not all((again[0] == a).all() for a in again[1:])  # one stream per call


# -- exceptions (CPython: ProcessPoolExecutorTest.test_traceback) -----------------------------


def test_traceback(executor: Executor):
    future = executor.submit(calls.raise_runtime_error)
    with pytest.raises(RuntimeError) as caught:
        future.result(60)
    assert type(caught.value) is RuntimeError and caught.value.args == (123,)
    cause = caught.value.__cause__
    assert type(cause) is RemoteTraceback
    assert "raise RuntimeError(123)  # some comment" in cause.tb


def test_an_exception_that_does_not_pickle_arrives_as_its_text(executor: Executor):
    def unpicklable() -> None:
        class Local(Exception):
            def __reduce__(self):  # type: ignore[override]
                raise TypeError("no")

        raise Local("local trouble")

    with pytest.raises(TaskFailed, match="Local: local trouble"):
        executor.submit(unpicklable).result(60)


# -- as_completed and wait (CPython: AsCompletedTests, WaitTests) -----------------------------


def test_as_completed(executor: Executor):
    futures = [executor.submit(calls.sleep_and_return, 0.01 * i, i) for i in range(8)]
    done = {f.result() for f in cf.as_completed(futures, timeout=60)}
    assert done == set(range(8))


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[str]:
    """A file that calls.gated waits for: created when the test ends, so the call ends."""
    path = tmp_path / "gate"
    yield str(path)
    path.touch()


def test_as_completed_timeout(executor: Executor, gate: str):
    slow = executor.submit(calls.gated, gate)
    fast = executor.submit(calls.mul, 2, 3)
    seen = []
    with pytest.raises(TimeoutError):
        for future in cf.as_completed([slow, fast], timeout=5):
            seen.append(future)
    assert seen == [fast]


def test_wait_first_completed(executor: Executor, gate: str):
    slow = executor.submit(calls.gated, gate)
    fast = executor.submit(calls.mul, 21, 2)
    done, not_done = cf.wait([slow, fast], timeout=60, return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}


def test_wait_first_exception(executor: Executor, gate: str):
    failing = executor.submit(divmod, 1, 0)
    slow = executor.submit(calls.gated, gate)
    done, not_done = cf.wait([failing, slow], timeout=60, return_when=cf.FIRST_EXCEPTION)
    assert done == {failing} and not_done == {slow}
    assert isinstance(failing.exception(), ZeroDivisionError)


def test_wait_all_completed(executor: Executor):
    futures = [executor.submit(calls.mul, i, i) for i in range(5)] + [
        executor.submit(divmod, 1, 0)]
    done, not_done = cf.wait(futures, timeout=60, return_when=cf.ALL_COMPLETED)
    assert done == set(futures) and not not_done


def test_wait_timeout(executor: Executor, gate: str):
    slow = executor.submit(calls.gated, gate)
    fast = executor.submit(calls.mul, 1, 1)
    done, not_done = cf.wait([fast, slow], timeout=3, return_when=cf.ALL_COMPLETED)
    assert done == {fast} and not_done == {slow}


# -- shutdown (CPython: ExecutorShutdownTest) -------------------------------------------------


def test_run_after_shutdown(local_cluster: Path):
    ex = Executor(credentials=str(local_cluster), directory=False)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 5)


def test_shutdown_waits_for_what_was_submitted(local_cluster: Path):
    ex = Executor(credentials=str(local_cluster), directory=SAMPLES)
    futures = [ex.submit(calls.sleep_and_return, 0.05, i) for i in range(10)]
    ex.shutdown(wait=True)
    assert [f.result(0) for f in futures] == list(range(10))


def test_cancel_futures(local_cluster: Path):
    ex = Executor(credentials=str(local_cluster), directory=SAMPLES)
    futures = [ex.submit(calls.sleep_and_return, 0.1) for _ in range(50)]
    # (the coordinator starts in a thread: once it sends calls, a shutdown has some to finish)
    wait_for(lambda: any(f.running() or f.done() for f in futures), 60, "a call to be sent")
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    assert len(cancelled) > 20  # with two workers, most were still waiting
    others = [f for f in futures if not f.cancelled()]
    assert others and all(f.done() and f.exception() is None for f in others)


def test_shutdown_no_wait(local_cluster: Path):
    ex = Executor(credentials=str(local_cluster), directory=SAMPLES)
    futures = [ex.submit(calls.sleep_and_return, 0.05, i) for i in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(60) for f in futures] == list(range(4))
    ex._thread.join(60)
    assert not ex._thread.is_alive()


def test_a_future_cancelled_before_it_is_sent_never_runs(local_cluster: Path, tmp_path: Path):
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    with Executor(credentials=str(local_cluster), directory=SAMPLES) as ex:
        blockers = [ex.submit(calls.gated, str(gate)) for _ in range(20)]
        late = ex.submit(calls.marked, 99, str(marks))
        assert late.cancel()
        gate.touch()
    assert late.cancelled() and not list(marks.iterdir())
    assert all(b.done() for b in blockers)


def test_a_private_local_cluster_is_started_and_stopped(tmp_path: Path):
    with Executor(cores=1, directory=False) as ex:
        assert ex.submit(pow, 3, 3).result(60) == 27
        local = ex._local
        assert local is not None and local.agent is not None and local.redis is not None
        agent = psutil.Process(local.agent.pid)
        assert local.forks is not None
        forks = psutil.Process(local.forks.pid)
        running = {local.redis.pid, agent.pid, forks.pid,
                   *(c.pid for p in (agent, forks) for c in p.children(recursive=True))}
        assert len(running) >= 5  # its redis-server, agent, data server, fork server, worker
        with cf.ProcessPoolExecutor(1) as pool:  # its children end: they stop nothing of ours
            assert list(pool.map(abs, [-1])) == [1]
        assert ex.submit(pow, 3, 2).result(60) == 9
    assert ex._local is None
    left = [psutil.Process(pid) for pid in running if psutil.pid_exists(pid)]
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_broken_cluster_fails_every_waiting_future(creds_file: Path):
    """No worker within worker_timeout: the Executor stops, its Futures say why."""
    with Executor(credentials=str(creds_file), worker_timeout=1, directory=False) as ex:
        future = ex.submit(pow, 2, 2)
        with pytest.raises(BrokenCluster, match="no worker appeared within 1 s"):
            future.result(120)
        with pytest.raises(BrokenCluster):
            ex.submit(pow, 2, 2)


def test_timeout_stops_the_executor(local_cluster: Path, gate: str):
    with Executor(credentials=str(local_cluster), directory=SAMPLES, timeout=3) as ex:
        stuck = ex.submit(calls.gated, gate)
        with pytest.raises(BrokenCluster, match="did not finish within 3 s"):
            stuck.result(120)


def test_progress_shows_the_bar_of_cluster_submit(local_cluster: Path,
                                                  capfd: pytest.CaptureFixture[str]):
    with Executor(credentials=str(local_cluster), directory=False, progress="bar") as ex:
        assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]
    err = capfd.readouterr().err
    assert "unit" in err and "reissued" in err, err


# -- the same program, ProcessPoolExecutor and cluster.Executor -------------------------------


def program(ex: cf.Executor) -> list[object]:
    """What a user's existing code might do with an executor."""
    out: list[object] = list(ex.map(calls.noisy_stats, range(40), [200] * 40))
    out += [f.result() for f in [ex.submit(calls.power, i, exponent=3) for i in range(10)]]
    out += list(ex.map(calls.mul, range(30), range(30), chunksize=4))
    return out


def test_the_same_program_gives_the_same_results_as_process_pool(executor: Executor):
    with cf.ProcessPoolExecutor(2) as pool:
        expected = program(pool)
    assert calls.same(program(executor), expected)


def test_a_worker_sigkilled_mid_map_loses_nothing(local_cluster: Path, tmp_path: Path):
    """Kill the worker computing call 0 of a map (it waits for a gate): the call is computed
    again by another worker, and every result arrives once, in order."""
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    gates = [str(gate)] + [None] * 23
    with cf.ProcessPoolExecutor(2) as pool:
        expected = list(pool.map(calls.marked, range(24), [str(tmp_path)] * 24))
    with Executor(credentials=str(local_cluster), directory=SAMPLES) as ex:
        results = ex.map(calls.marked, range(24), [str(marks)] * 24, gates)
        first = wait_for(lambda: [m for m in marks.iterdir() if m.name.startswith("0.")], 60,
                         "call 0 to start")
        os.kill(int(first[0].name.split(".")[1]), signal.SIGKILL)
        gate.touch()
        got = list(results)
    assert got == expected
    assert len([m for m in marks.iterdir() if m.name.startswith("0.")]) == 2  # run twice


# -- signed pickles ---------------------------------------------------------------------------


class Planter:
    """Loading this pickle would create a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[override]
        return (Path.touch, (Path(self.path),))


def test_a_tampered_pickled_function_is_refused_and_never_loaded(local_cluster: Path,
                                                                 tmp_path: Path):
    import cloudpickle

    planted = tmp_path / "planted"
    with Executor(credentials=str(local_cluster), directory=SAMPLES, max_attempts=1) as ex:
        genuine = ex._sign(cloudpickle.dumps(calls.mul))
        evil = cloudpickle.dumps(Planter(str(planted)))

        def target() -> None:
            return None

        # a pickle signed for another job, and one swapped in after signing
        other_job = Keyring(ex._creds.key).sign_code("000000000000", evil)
        for signed in ([np.frombuffer(evil, np.uint8), np.frombuffer(other_job, np.uint8)],
                       [np.frombuffer(evil, np.uint8), genuine[1]]):
            ex._signed[target] = signed
            with pytest.raises(TaskFailed, match="not signed with this cluster's key"):
                ex.submit(target).result(60)
        assert ex.submit(calls.mul, 6, 7).result(60) == 42  # the executor goes on
    assert not planted.exists()


def test_a_tampered_pickle_of_arguments_is_refused(local_cluster: Path, tmp_path: Path):
    import cloudpickle

    planted = tmp_path / "planted"
    with Executor(credentials=str(local_cluster), directory=SAMPLES, max_attempts=1) as ex:
        original = ex._call

        def tampered(args: tuple, kwargs: dict) -> dict:  # type: ignore[type-arg]
            call = original(args, kwargs)
            call["p"][0] = np.frombuffer(cloudpickle.dumps(((Planter(str(planted)),), {})),
                                         np.uint8)
            return call

        ex._call = tampered  # type: ignore[method-assign]
        with pytest.raises(TaskFailed, match="not signed with this cluster's key"):
            ex.submit(calls.mul, Path("/x"), 1).result(60)  # a Path: pickled
    assert not planted.exists()


def test_cluster_run_returns_the_result_and_the_summary(local_cluster: Path, tmp_path: Path):
    out = tmp_path / "pi.json"
    result = cluster.run(SAMPLES.parent.parent / "jobs" / "monte_carlo_pi.py",
                         {"units": 8, "samples": 1000}, credentials=str(local_cluster),
                         output=str(out), seed=3)
    assert 3.0 < result.value < 3.3
    assert result.summary().startswith("8 units on ")
    assert out.exists()
    again = cluster.run(SAMPLES.parent.parent / "jobs" / "monte_carlo_pi.py",
                        {"units": 8, "samples": 1000}, credentials=str(local_cluster), seed=3)
    assert again.value == result.value
    with pytest.raises(cluster.ClusterError, match="no option 'sead'"):
        cluster.run("jobs/monte_carlo_pi.py", sead=3)



def test_workers_forked_from_one_process_draw_different_random_numbers(tmp_path: Path):
    """Workers forked by the fork server would share its numpy random state (the same
    "random" numbers on every worker); each draws its own, as a fresh process would."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with Executor(cores=2, directory=SAMPLES) as ex:
        first = ex.submit(calls.meet_and_draw, a, b)
        wait_for(lambda: Path(a).exists(), 60, "the first call to start on a worker")
        second = ex.submit(calls.meet_and_draw, b, a)  # the first's worker is busy
        (pid1, draw1), (pid2, draw2) = first.result(60), second.result(60)
    assert pid1 != pid2
    assert draw1 != draw2
