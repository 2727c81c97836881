"""The liveness watch: a silent peer (frozen, dead, unreachable) or a silent store is named in one line within
the timeout; a peer that stopped on purpose, or a watch held up itself, is not."""

from __future__ import annotations

import time

import torch.distributed as dist

from megatron_glm.training.heartbeat import Heartbeat, start_heartbeat

TIMEOUT = 0.6


def _watches(world: int, store=None) -> tuple[list[Heartbeat], list[list[str]]]:
    store = store or dist.HashStore()
    lost: list[list[str]] = [[] for _ in range(world)]
    watches = [Heartbeat(store, r, world, TIMEOUT, on_lost=lost[r].append) for r in range(world)]
    return [w.start() for w in watches], lost


def _freeze(watch: Heartbeat) -> None:
    """Stop beating without saying so, as a SIGSTOPped or killed process does."""
    watch._stop.set()
    watch._thread.join()


def _wait(lost: list[str], limit: float) -> float:
    start = time.monotonic()
    while not lost and time.monotonic() - start < limit:
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_frozen_peer_is_named_within_the_timeout() -> None:
    watches, lost = _watches(3)
    time.sleep(3 * TIMEOUT)  # all beating: nobody is reported
    assert lost == [[], [], []]
    _freeze(watches[2])
    took = _wait(lost[0], 5 * TIMEOUT)
    assert TIMEOUT - watches[2].interval < took < 2 * TIMEOUT, took  # silent > TIMEOUT since its last beat
    _wait(lost[1], TIMEOUT)
    for r in (0, 1):
        assert lost[r] == [
            f"rank {r} of 3: lost contact with rank 2, which exited, was killed or froze: silent for {TIMEOUT:g} s "
            "(see its output); stopping this rank too"
        ]
    for w in watches[:2]:
        w.stop()


def test_several_silent_ranks_are_named_together() -> None:
    watches, lost = _watches(4)
    _freeze(watches[1])
    _freeze(watches[3])
    _wait(lost[0], 5 * TIMEOUT)
    assert len(lost[0]) == 1 and "lost contact with ranks 1, 3, which" in lost[0][0], lost[0]
    for w in (watches[0], watches[2]):
        w.stop()


def test_a_peer_that_stopped_on_purpose_is_not_reported() -> None:
    watches, lost = _watches(2)
    watches[1].stop()
    time.sleep(3 * TIMEOUT)
    assert lost == [[], []]
    watches[0].stop()


class _DeadStore:
    """A store whose host process is gone: every operation fails."""

    def __getattr__(self, name: str):
        def fail(*_a, **_k):
            raise RuntimeError("Connection reset by peer")

        return fail


def test_a_peer_is_judged_from_its_first_beat() -> None:
    """Ranks reach the watch at different times (a slow start-up): one not there yet is not called silent."""
    store, lost = dist.HashStore(), []
    watch = Heartbeat(store, 0, 2, TIMEOUT, on_lost=lost.append).start()
    time.sleep(3 * TIMEOUT)  # rank 1 has not started its watch
    assert lost == []
    late = Heartbeat(store, 1, 2, TIMEOUT, on_lost=lost.append).start()
    time.sleep(2 * TIMEOUT)
    assert lost == []
    _freeze(late)
    _wait(lost, 5 * TIMEOUT)
    assert len(lost) == 1 and "lost contact with rank 1," in lost[0]
    watch.stop()


def test_a_silent_store_is_reported() -> None:
    store = dist.HashStore()
    lost: list[str] = []
    watch = Heartbeat(store, 0, 2, TIMEOUT, on_lost=lost.append).start()
    watch.store = _DeadStore()
    _wait(lost, 5 * TIMEOUT)
    assert lost == [
        "rank 0 of 2: lost contact with the rendezvous store (and the process hosting it: rank 0 or the "
        f"launcher), which exited, was killed or froze: silent for {TIMEOUT:g} s (see its output); stopping "
        "this rank too"
    ]


def test_a_watch_held_up_itself_judges_nobody_by_its_own_delay() -> None:
    """A thread that did not run for longer than the timeout (a stalled host) restarts its peers' clocks."""
    store, lost = dist.HashStore(), []
    clock = {"now": 0.0}
    watch = Heartbeat(store, 0, 2, 10.0, interval=0.01, on_lost=lost.append, clock=lambda: clock["now"])
    store.add("beat/1", 1)
    watch.start()
    for _ in range(20):  # peer 1 beats while time passes normally
        clock["now"] += 1.0
        store.add("beat/1", 1)
        time.sleep(0.02)
    clock["now"] += 60.0  # this thread was held up for a minute: peer 1 looks silent, but so did we
    time.sleep(0.2)
    assert lost == []
    for _ in range(12):  # then peer 1 really stays silent past the timeout, time passing normally
        clock["now"] += 1.0
        time.sleep(0.02)
    _wait(lost, 1.0)
    assert len(lost) == 1 and "lost contact with rank 1," in lost[0]
    watch.stop()


def test_start_heartbeat_is_off_for_one_process_or_timeout_zero() -> None:
    assert start_heartbeat(30.0) is None  # no process group
    assert start_heartbeat(0.0) is None


def test_a_busy_main_thread_keeps_beating() -> None:
    """A rank whose main thread computes (pure Python: it holds the GIL between switches) keeps beating."""
    watches, lost = _watches(2)
    end = time.monotonic() + 4 * TIMEOUT
    while time.monotonic() < end:
        sum(i * i for i in range(20000))
    assert lost == [[], []]
    for w in watches:
        w.stop()


def test_timeouts_are_checked() -> None:
    from megatron_glm.config import load_config, problems

    cfg = load_config(["--heartbeat-timeout", "45", "--distributed-timeout-minutes", "10"])
    assert (cfg.training.heartbeat_timeout, cfg.training.distributed_timeout_minutes) == (45.0, 10)
    assert problems(load_config(["--heartbeat-timeout", "-1", "--distributed-timeout-minutes", "0"])) == [
        "training.distributed_timeout_minutes must be > 0, got 0",
        "training.heartbeat_timeout must be >= 0 seconds (0: off), got -1.0",
    ]
