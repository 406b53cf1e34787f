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

The same thread watches for a job that stopped making progress and for signals the main thread cannot
handle:

- **stuck**: when this rank has not started or completed a training step or an evaluation batch for
  ``progress_timeout`` seconds (the clock runs from the first step, and is paused while a checkpoint is
  written or read), it declares the job stuck in the store. Every rank then publishes where its main
  thread is and how many steps it completed; the declaring rank names the ranks that are behind (a rank
  waiting in a collective the others never entered has completed fewer steps) and where each rank is,
  every rank prints the Python stack of its main thread, and all exit with code 1. The default timeout is
  well under the process group's, so the cause is printed instead of a collective's timeout 30 minutes
  later (or never: a gloo/NCCL wait can outlive it).
- **SIGTERM / SIGINT**: a main thread blocked inside a gloo or NCCL call never returns to Python, so
  Python's (and Lightning's) signal handlers never run and a stuck job ignores SIGTERM. The C-level signal
  handler still writes the signal number to ``signal.set_wakeup_fd``'s pipe, which this thread reads: if
  the process is still alive ``signal_grace`` seconds later, it reports the signal to the other ranks (so
  that one signalled rank, or the launcher, ends the whole job) and exits with 128 + the signal number.

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
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Optional

import torch.distributed as dist

from lightning_mp._compat import get_default_store

_FAILURE = "lightning_mp/failure"
_HEARTBEAT = "lightning_mp/heartbeat/{rank}"
_STUCK = "lightning_mp/stuck"
_WHERE = "lightning_mp/where/{rank}"
_EXIT_CODE = 1
_STORE_CALL_TIMEOUT = timedelta(seconds=10)


def _lost_a_peer(error: BaseException) -> bool:
    """A communication failure (a symptom), not an error of this rank's own code."""
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, dist.DistError) or any(
        word in text for word in ("connection", "gloo", "nccl", "timed out", "timeout", "peer"))


class FailureWatch:
    """One per process; ``start`` once the default process group exists."""

    def __init__(self, interval: float = 1.0, silent_after: float = 5.0, grace: float = 30.0,
                 progress_timeout: Optional[float] = None, signal_grace: float = 5.0) -> None:
        self.interval = interval
        self.silent_after = silent_after
        self.grace = grace  # how long the failed rank itself may take to unwind before it is ended too
        self.progress_timeout = progress_timeout  # None: no progress watch
        self.signal_grace = signal_grace  # how long the main thread may take to act on SIGTERM itself
        self._progress_at: Optional[float] = None  # None: the clock is not running (before the first step, paused)
        self._completed = 0
        self._wakeup: Optional[tuple[int, int]] = None  # (read end, write end) of the signal wakeup pipe
        self._signalled: Optional[tuple[int, float]] = None
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
        self._progress_at, self._completed, self._signalled = None, 0, None
        self._watch_signals()
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
            # At most the calls of one round (four) can be under way, each bounded by the store timeout.
            thread.join(timeout=4 * _STORE_CALL_TIMEOUT.total_seconds() + self.interval)
        self._unwatch_signals()

    # ------------------------------------------------------------ progress
    @contextmanager
    def step(self) -> Iterator[None]:
        """Around one training step or evaluation batch: starting and completing it both count as progress."""
        self._progress_at = time.monotonic()
        yield
        self._completed += 1
        self._progress_at = time.monotonic()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Around work that may legitimately take longer than the timeout (writing or reading a checkpoint)."""
        running, self._progress_at = self._progress_at, None
        try:
            yield
        finally:
            if running is not None:
                self._progress_at = time.monotonic()

    def _stalled_for(self) -> float:
        at = self._progress_at
        return 0.0 if at is None or self.progress_timeout is None else time.monotonic() - at

    def _where(self) -> str:
        """Where the main thread is: its innermost frame, and the innermost frame outside installed packages."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        if frame is None:
            return "main thread not running"
        stack = traceback.extract_stack(frame)
        inner = stack[-1]
        text = f"{inner.name} ({inner.filename}:{inner.lineno})"
        own = [f for f in stack if "site-packages" not in f.filename and "/lib/python" not in f.filename]
        if own and own[-1] is not inner:
            text += f", called from {own[-1].name} ({own[-1].filename}:{own[-1].lineno})"
        return text

    def _print_stack(self, header: str) -> None:
        frame = sys._current_frames().get(threading.main_thread().ident)
        lines = "".join(traceback.format_stack(frame)) if frame is not None else "  (main thread not running)\n"
        sys.stderr.write(f"\n[lightning_mp] {header}\n"
                         f"[lightning_mp] rank {self._rank} main thread (most recent call last):\n"
                         f"{lines}")
        sys.stderr.flush()

    def _stuck_report(self, store: dist.Store, stalled: float) -> str:
        """Collect every rank's position (bounded wait) and name the ranks that are behind."""
        deadline = time.monotonic() + 3 * self.interval + 2
        positions: dict[int, tuple[int, str]] = {}
        while time.monotonic() < deadline:
            for rank in range(self._world_size):
                key = _WHERE.format(rank=rank)
                if rank not in positions and store.check([key]):
                    count, _, where = store.get(key).decode().partition(" ")
                    positions[rank] = (int(count), where)
            if len(positions) == self._world_size:
                break
            time.sleep(self.interval / 4)
        lines = [f"rank {r}: {c} steps completed, at {w}" for r, (c, w) in sorted(positions.items())]
        silent = [r for r in range(self._world_size) if r not in positions]
        lines += [f"rank {r}: no answer (killed, or its watch is stuck too)" for r in silent]
        return (f"no rank completed a training step or evaluation batch for {stalled:.0f} s"
                f" (progress_timeout={self.progress_timeout:g} s):{_suspects(positions, silent)} " + "; ".join(lines))

    # ------------------------------------------------------------ signals
    def _watch_signals(self) -> None:
        # The wakeup fd is process-wide and can only be set from the main thread; leave one that is in use alone.
        if self._wakeup is not None or threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        try:
            previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except ValueError:
            os.close(read), os.close(write)
            return
        if previous != -1:
            signal.set_wakeup_fd(previous)
            os.close(read), os.close(write)
            return
        self._wakeup = (read, write)

    def _unwatch_signals(self) -> None:
        if self._wakeup is None or threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(-1)
        for fd in self._wakeup:
            os.close(fd)
        self._wakeup = None

    def _read_signal(self) -> None:
        if self._wakeup is None or self._signalled is not None:
            return
        try:
            data = os.read(self._wakeup[0], 64)
        except (BlockingIOError, OSError):
            return
        for number in data:
            if number in (signal.SIGTERM, signal.SIGINT):
                self._signalled = (number, time.monotonic())
                return

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
            self._read_signal()
            if self._signalled is not None and time.monotonic() - self._signalled[1] > self.signal_grace:
                self._end_after_signal(store, self._signalled[0])
            if self._reported_here:
                # This rank's own failure: its main thread is unwinding with the real error; end it only if
                # the unwinding itself gets stuck (e.g. in a collective during teardown).
                if time.time() - self._reported_at > self.grace:
                    os._exit(_EXIT_CODE)
                continue
            try:
                store.set(heartbeat, str(time.time()))
                if self._stop.is_set():
                    continue
                self._watch_progress(store)
                if not store.check([_FAILURE]):
                    continue
                message = store.get(_FAILURE).decode()
            except Exception:
                return
            if self._reported_here:
                continue
            sys.stderr.write(f"\n[lightning_mp] stopping rank {self._rank}: {message}\n")
            if self.progress_timeout is not None and self._progress_at is not None:
                self._print_stack(f"rank {self._rank} was here when it stopped")
                self._linger()
            sys.stderr.flush()
            os._exit(_EXIT_CODE)

    def _watch_progress(self, store: dist.Store) -> None:
        if self.progress_timeout is None:
            return
        stalled = self._stalled_for()
        if stalled > self.progress_timeout:
            store.compare_set(_STUCK, "", str(self._rank))  # the first rank to notice declares it
        if not store.check([_STUCK]):
            return
        # The job was declared stuck (by this rank or another): say where this rank is, once.
        store.set(_WHERE.format(rank=self._rank), f"{self._completed} {self._where()}")
        if store.get(_STUCK).decode() != str(self._rank):
            return  # the declaring rank writes the report; this rank stops when it sees it
        message = self._stuck_report(store, max(stalled, self.progress_timeout))
        store.compare_set(_FAILURE, "", message)
        sys.stderr.write(f"\n[lightning_mp] stopping rank {self._rank}: {message}\n")
        self._print_stack(f"rank {self._rank} was here when it stopped")
        self._linger()
        os._exit(_EXIT_CODE)

    def _end_after_signal(self, store: dist.Store, number: int) -> None:
        name = signal.Signals(number).name
        message = (f"rank {self._rank} received {name} and its main thread did not stop within {self.signal_grace:g} s"
                   f" (at {self._where()})")
        try:
            store.compare_set(_FAILURE, "", message)
        except Exception:
            pass
        sys.stderr.write(f"\n[lightning_mp] stopping rank {self._rank}: {message}\n")
        self._print_stack(f"rank {self._rank} was here when it stopped")
        self._linger()
        os._exit(128 + number)

    def _linger(self) -> None:
        """Give the other ranks' watches time to read the report and print where they are: rank 0 hosts the
        store, which ends with it, and Lightning's launcher kills every rank once one child process exits."""
        time.sleep(2 * self.interval + 0.5)


def _suspects(positions: dict[int, tuple[int, str]], silent: list[int]) -> str:
    """Which ranks most likely hold the others up: those that completed fewer steps; with equal counts, those
    whose main thread is where no majority of ranks is (e.g. in a collective the others never entered)."""
    def ranks(found: list[int]) -> str:
        return f"rank{'s' if len(found) > 1 else ''} {', '.join(map(str, found))} {'are' if len(found) > 1 else 'is'}"

    counts = {c for c, _ in positions.values()}
    if len(counts) > 1:
        low = min(counts)
        return f" {ranks([r for r, (c, _) in sorted(positions.items()) if c == low])} behind ({low} steps completed," \
               " the others more);"
    places: dict[str, list[int]] = {}
    for rank, (_, where) in sorted(positions.items()):
        places.setdefault(where, []).append(rank)
    common = max(places.values(), key=len, default=[])
    if 2 * len(common) > len(positions) and len(places) > 1:
        odd = sorted(r for group in places.values() if group is not common for r in group)
        return f" {ranks(odd)} where no other rank is (most likely holding the others up);"
    if silent:
        return f" {ranks(silent)} not answering;"
    return ""
