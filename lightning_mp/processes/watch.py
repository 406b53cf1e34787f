"""When one rank fails, every rank stops soon, and says which rank failed and why.

Without help, the other ranks of a failed job wait inside their next collective until the process
group's timeout (NCCL: 30 minutes by default), and what they finally print is about a broken connection,
not about the rank that caused it. Here every rank runs a small watch thread that talks to the job's
rendezvous store (the c10d store every rank already reaches, through a clone of its own):

- it writes a heartbeat every second, so a rank that was killed (SIGKILL, OOM killer) is named by its
  silence;
- when a rank's Trainer raises, the strategy reports the exception to the store (first report wins);
- a watch thread that sees a report on another rank prints it and ends its process with exit code 1
  at once (``os._exit``: its main thread may be stuck inside a collective and cannot be unwound).

If the store itself is gone, the thread stops quietly: rank 0 hosts it and also leaves it when a job ends
normally, and the collectives of a job whose rank 0 died fail by themselves.

The thread must never be inside a store call when the interpreter shuts down: Python ends a daemon thread
that comes back from C++ during shutdown by unwinding it through pybind11's GIL guard, which aborts the
whole process ("terminate called without an active exception", exit code -6) after a successful run. So
the strategy stops the watch when the Trainer tears down, and ``stop`` waits for as long as one store call
can take.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from lightning_mp._compat import get_default_store

_FAILURE = "lightning_mp/failure"
_HEARTBEAT = "lightning_mp/heartbeat/{rank}"
_EXIT_CODE = 1
_STORE_CALL_TIMEOUT = timedelta(seconds=10)


def _lost_a_peer(error: BaseException) -> bool:
    """A communication failure (a symptom), not an error of this rank's own code."""
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, dist.DistError) or any(
        word in text for word in ("connection", "gloo", "nccl", "timed out", "timeout", "peer"))


class FailureWatch:
    """One per process; ``start`` once the default process group exists."""

    def __init__(self, interval: float = 1.0, silent_after: float = 5.0, grace: float = 30.0) -> None:
        self.interval = interval
        self.silent_after = silent_after
        self.grace = grace  # how long the failed rank itself may take to unwind before it is ended too
        self._store: Optional[dist.Store] = None
        self._rank = 0
        self._world_size = 1
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._reported_here = False
        self._reported_at = 0.0
        self._exit_hook_registered = False

    def start(self) -> None:
        if self._thread is not None or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        store = get_default_store()
        self._store = store.clone()  # the report path (main thread); the watch thread gets its own clone
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(store.clone(),), name="lightning_mp-failure-watch",
                                        daemon=True)
        self._thread.start()
        if not self._exit_hook_registered:  # a backstop: the strategy's teardown normally stops it first
            atexit.register(self.stop)
            self._exit_hook_registered = True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """End the watch thread and wait for it (see the module's docstring for why waiting matters).

        A rank that reported its own failure keeps its watch: it ends the process if unwinding hangs."""
        if self._reported_here:
            return
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            # At most the calls of one round (three) can be under way, each bounded by the store timeout.
            thread.join(timeout=3 * _STORE_CALL_TIMEOUT.total_seconds() + self.interval)

    def report(self, error: BaseException) -> None:
        """Record this rank's failure for the others (call before the process unwinds)."""
        if self._store is None or self._reported_here:
            return
        self._reported_here = True
        self._reported_at = time.time()
        message = f"rank {self._rank} failed: {type(error).__name__}: {error}".strip()
        silent = self._silent_ranks(self._store)
        # A peer that was killed breaks this rank's connections at once, long before its heartbeat is stale:
        # wait (a few seconds, within any sane timeout) for the silence that names it.
        deadline = time.time() + self.silent_after + 2 * self.interval
        while not silent and _lost_a_peer(error) and time.time() < deadline:
            time.sleep(self.interval)
            silent = self._silent_ranks(self._store)
        if silent:  # this rank's error is most likely the symptom (a broken connection to the silent one)
            message = f"{', '.join(silent)}; seen from {message}"
        try:
            # compare_set with an expected value of "" writes only when the key is absent: the first report wins.
            self._store.compare_set(_FAILURE, "", message)
        except Exception:  # the store is gone too; the other ranks will notice that themselves
            pass

    def _silent_ranks(self, store: dist.Store) -> list[str]:
        now, silent = time.time(), []
        for rank in range(self._world_size):
            if rank == self._rank:
                continue
            key = _HEARTBEAT.format(rank=rank)
            try:
                if store.check([key]):
                    seen = float(store.get(key).decode())
                    if now - seen > self.silent_after:
                        silent.append(f"rank {rank} stopped responding {now - seen:.0f} s ago (killed or hung)")
            except Exception:
                return []
        return silent

    def _watch(self, store: dist.Store) -> None:
        store.set_timeout(_STORE_CALL_TIMEOUT)
        heartbeat = _HEARTBEAT.format(rank=self._rank)
        while not self._stop.wait(self.interval):
            if self._reported_here:
                # This rank's own failure: its main thread is unwinding with the real error; end it only if
                # the unwinding itself gets stuck (e.g. in a collective during teardown).
                if time.time() - self._reported_at > self.grace:
                    os._exit(_EXIT_CODE)
                continue
            try:
                store.set(heartbeat, str(time.time()))
                if self._stop.is_set() or not store.check([_FAILURE]):
                    continue
                message = store.get(_FAILURE).decode()
            except Exception:
                return
            if self._reported_here:
                continue
            sys.stderr.write(f"\n[lightning_mp] stopping rank {self._rank}: {message}\n")
            sys.stderr.flush()
            os._exit(_EXIT_CODE)
