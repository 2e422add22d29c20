"""Calls in worker processes within a hard deadline (paced_ds.runtime.deadline_pool)."""

from __future__ import annotations

import multiprocessing
import operator
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from paced_ds.runtime.deadline_pool import DeadlinePool

BUDGET_S = 0.5
# A worker starting (a bare interpreter, no warm-up) is waited for on top of the budget,
# and a busy machine is slow to start one: the deadlines below are measured after a start.
SLACK_S = 0.3


@pytest.fixture
def pool():
    pool = DeadlinePool("test", start_timeout_s=30, max_idle=4)
    assert pool.run([(os.getpid, ())], budget_s=5)[0][0] == "ok"  # started
    yield pool
    pool.close()


def worker_pid(pool: DeadlinePool) -> int:
    status, pid = pool.run([(os.getpid, ())], budget_s=5)[0]
    assert status == "ok"
    return pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_late_call_times_out_in_the_main_thread_and_the_worker_stays(pool):
    before = worker_pid(pool)
    start_s = time.perf_counter()
    assert pool.run([(time.sleep, (30,))], budget_s=BUDGET_S) == [("timeout", None)]
    assert time.perf_counter() - start_s < BUDGET_S + SLACK_S
    assert worker_pid(pool) == before  # stopped by its own deadline, not killed


def test_a_late_call_times_out_in_a_worker_thread(pool):
    result = {}

    def call():
        start_s = time.perf_counter()
        result["outcomes"] = pool.run([(time.sleep, (30,))], budget_s=BUDGET_S)
        result["s"] = time.perf_counter() - start_s

    thread = threading.Thread(target=call, daemon=True)  # a hang must not block exit
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert result["outcomes"] == [("timeout", None)]
    assert result["s"] < BUDGET_S + SLACK_S


def test_a_call_deaf_to_its_deadline_is_killed_and_the_pool_goes_on(pool):
    # With SIGALRM blocked nothing inside the worker stops the sleep (as with a long C
    # call): the pool kills it at the deadline; a new worker answers the next call.
    deaf = worker_pid(pool)
    assert pool.run([(signal.pthread_sigmask, (signal.SIG_BLOCK, [signal.SIGALRM]))],
                    budget_s=5)[0][0] == "ok"
    assert worker_pid(pool) == deaf
    start_s = time.perf_counter()
    assert pool.run([(time.sleep, (30,))], budget_s=BUDGET_S) == [("timeout", None)]
    assert time.perf_counter() - start_s < BUDGET_S + SLACK_S
    assert not alive(deaf)
    after = worker_pid(pool)
    assert after != deaf
    assert pool.run([(operator.mul, (6, 7))], budget_s=5) == [("ok", 42)]


def test_a_worker_killed_while_idle_is_replaced(pool):
    idle = worker_pid(pool)
    os.kill(idle, signal.SIGKILL)  # from outside (the OOM killer, a user)
    time.sleep(0.2)
    assert pool.run([(operator.mul, (6, 7))], budget_s=5) == [("ok", 42)]
    assert worker_pid(pool) != idle


def test_outcomes_keep_the_order_of_the_tasks_and_run_in_parallel(pool):
    pool.run([(time.sleep, (0,))] * 4, budget_s=5, workers=4)  # four workers started
    # The first task finishes last; the others, on the other workers, before it.
    tasks = [(time.sleep, (0.6,))] + [(operator.mul, (i, i)) for i in range(1, 12)]
    tasks += [(operator.truediv, (1, 0))]
    outcomes = pool.run(tasks, budget_s=5, workers=4)
    assert outcomes == ([("ok", None)] + [("ok", i * i) for i in range(1, 12)]
                        + [("error", "ZeroDivisionError: division by zero")])
    start_s = time.perf_counter()
    assert pool.run([(time.sleep, (0.4,))] * 4, budget_s=5, workers=4) == [("ok", None)] * 4
    assert time.perf_counter() - start_s < 4 * 0.4 * 0.75


def _child_worker_pid(pool, queue):
    queue.put(worker_pid(pool))


def test_a_forked_child_starts_its_own_workers(pool):
    parent_worker = worker_pid(pool)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_worker_pid, args=(pool, queue))
    child.start()
    child_worker = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert child_worker != parent_worker
    assert worker_pid(pool) == parent_worker  # the parent's worker is still its own, alive


def test_without_workers_every_outcome_is_unavailable(monkeypatch):
    reasons = []
    pool = DeadlinePool("test", start_timeout_s=30, max_idle=2, on_unavailable=reasons.append)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # its workers die at once
    assert pool.run([(os.getpid, ()), (os.getpid, ())], budget_s=5) == [("unavailable", None)] * 2
    assert len(reasons) == 1 and "test worker exited" in reasons[0]
    assert pool.unavailable
    assert pool.run([(os.getpid, ())], budget_s=5) == [("unavailable", None)]  # no new start
    assert len(reasons) == 1


def test_the_workers_stop_when_the_process_leaves_with_os_exit():
    # paced_ds.train leaves with os._exit, which skips atexit: the pool's own exit hook
    # (paced_ds.runtime.exit) stops its workers at run_hooks.
    done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os
        from paced_ds.runtime.deadline_pool import DeadlinePool
        from paced_ds.runtime.exit import run_hooks

        pool = DeadlinePool("test", start_timeout_s=30, max_idle=2)
        pool.run([(os.getpid, ())], budget_s=5)
        workers = list(pool._idle)  # the worker and its spare
        run_hooks()
        print(len(workers), len(pool._idle), sum(w.process.returncode is not None for w in workers),
              flush=True)
        os._exit(0)
    """)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "0", "2"]  # two workers, none left idle, both stopped


def test_a_warm_up_must_be_importable_in_a_fresh_interpreter():
    with pytest.raises(ValueError, match="must be importable"):
        DeadlinePool("test", start_timeout_s=30, max_idle=2, warm_up=lambda: None)
