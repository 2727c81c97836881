"""A liveness watch that does not depend on the backend: a lost or frozen peer ends every rank within a bound.

A collective whose peer died raises on gloo, but a peer that froze (``SIGSTOP``, a hung host, a lost node)
or any lost peer under NCCL leaves the others blocked in the collective until the process-group timeout
(``--distributed-timeout-minutes``, 30 by default). So every rank runs a daemon thread that bumps its own
counter in the rendezvous store (``store.add``, a clone of the default group's store: a connection of its
own) every ``timeout / 6`` seconds and reads every rank's counter in one ``multi_get``. A peer whose
counter has not moved for ``timeout`` seconds of this thread's own clock (no clock is compared across
hosts), or a store that has not answered for as long (the process hosting it - rank 0 without a launcher,
the launcher's agent under torchrun - is gone), ends this process: the one-line ``error: ... lost contact
with ...`` of :mod:`megatron_glm.training.failures` on stderr, then ``os._exit(2)`` (the main thread is stuck
in a collective and cannot be unwound). A rank that is busy (a long save, a compilation) keeps beating:
the thread is its own. If this thread itself was held up for half the timeout (a stalled host), it
restarts every peer's clock rather than judge them by its own delay. A peer is judged from its first beat
on: ranks leave the set-up before the watch (DeepSpeed's comm start-up, which may build an extension) at
different times, and until then the collectives' own timeout (``--distributed-timeout-minutes``) applies.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from megatron_glm.training.failures import lost_contact_line

__all__ = ["Heartbeat", "start_heartbeat"]

EXIT_CODE = 2  # the CLI's exit status for an error (megatron_glm.errors.run_cli)
_STOPPED = b"stopped"


def _die(line: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {line}\n")  # one write: the ranks of a job share stderr
    sys.stderr.flush()
    os._exit(EXIT_CODE)


class Heartbeat:
    """The watch of one rank (see the module doc); :meth:`stop` before a clean exit."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world: int,
        timeout: float,
        *,
        interval: float = 0.0,
        on_lost: Callable[[str], None] = _die,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.rank, self.world, self.timeout = store, rank, world, float(timeout)
        self.interval = interval or max(0.05, self.timeout / 6)
        self.on_lost, self.clock = on_lost, clock
        self.keys = [f"beat/{r}" for r in range(world)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.store.add(self.keys[self.rank], 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and watching, and tell the peers this rank left on purpose (they stop watching it)."""
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):  # the store went first: nobody is left to tell
            self.store.set(self.keys[self.rank], _STOPPED)

    def _poll(self) -> list[bytes] | None:
        """Beat, then every rank's counter (``None`` when the store did not answer)."""
        try:
            self.store.add(self.keys[self.rank], 1)
            if not self.store.check(self.keys):  # a rank that has not beaten yet: its key does not exist
                return [self.store.get(k) if self.store.check([k]) else b"" for k in self.keys]
            return self.store.multi_get(self.keys)
        except Exception:  # timeout, connection refused or reset: judged below by how long it lasts
            return None

    def _run(self) -> None:
        now = self.clock()
        seen: list[bytes] = [b""] * self.world
        changed = [now] * self.world
        store_ok = last = now
        while not self._stop.wait(self.interval):
            values, now = self._poll(), self.clock()
            if now - last > self.timeout / 2:  # this thread was held up: judge nobody by that delay
                changed = [now] * self.world
                store_ok = now
            last = now
            if values is None:
                if now - store_ok > self.timeout:
                    self._lost("the rendezvous store (and the process hosting it: rank 0 or the launcher)")
                    return
                continue
            store_ok = now
            for r, v in enumerate(values):
                if v != seen[r] or v == _STOPPED:
                    seen[r], changed[r] = v, now
            silent = [r for r in range(self.world) if r != self.rank and seen[r] and now - changed[r] > self.timeout]
            if silent:
                self._lost(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}")
                return

    def _lost(self, who: str) -> None:
        if not self._stop.is_set():
            self.on_lost(
                lost_contact_line(
                    self.rank, self.world, who, f"which exited, was killed or froze: silent for {self.timeout:g} s"
                )
            )


def start_heartbeat(timeout: float) -> Heartbeat | None:
    """Start this rank's watch over the default process group (``None`` when ``timeout`` is 0 or the world is
    one process). Keys live under ``megatron_glm/liveness/<launcher restart>/`` in the default group's store."""
    if timeout <= 0 or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    store = dist.distributed_c10d._get_default_store().clone()
    store.set_timeout(timedelta(seconds=max(1.0, timeout / 6)))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"megatron_glm/liveness/{restart}/", store)
    return Heartbeat(prefixed, dist.get_rank(), dist.get_world_size(), timeout).start()
