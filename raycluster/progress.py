"""Progress of work that runs inside Ray (Train workers, Tune trials), drawn by the driver's bar.

The driver opens :func:`tracked`, which starts a zero-CPU actor holding each worker's count and a
thread that polls it once a second into the step's progress bar (:func:`raycluster.console.progress`);
the workers get a :class:`Reporter` (it pickles with the actor's handle) and set their own count as
the work goes. A count is set, not added, so a restarted worker that reports again from its
checkpoint does not count twice.
"""
from __future__ import annotations

import contextlib
import threading
import time

from raycluster import console

POLL_S = 1.0        # how often the driver reads the counts
SEND_S = 0.5        # how often a worker sends its count (the last one of a phase is always sent)


class _Counts:
    """The actor: each worker's latest count and the last status text."""

    def __init__(self):
        self.done: dict = {}
        self.info = ""

    def set(self, key, n: float, info: str | None = None) -> None:
        self.done[key] = n
        if info is not None:
            self.info = info

    def get(self) -> tuple[float, str]:
        return sum(self.done.values()), self.info


class Reporter:
    """A worker's side: ``set(count)``, throttled to one message every ``SEND_S``."""

    def __init__(self, actor):
        self.actor, self._last = actor, 0.0

    def __getstate__(self):
        return {"actor": self.actor}

    def __setstate__(self, state):
        self.actor, self._last = state["actor"], 0.0

    def set(self, n: float, key=0, info: str | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if force or info is not None or now - self._last >= SEND_S:
            self._last = now
            self.actor.set.remote(key, n, info)


@contextlib.contextmanager
def tracked(total: float | None, desc: str, unit: str, initial: float = 0):
    """A progress bar over work done in Ray; yields the :class:`Reporter` to hand to the workers."""
    import ray
    actor = ray.remote(num_cpus=0)(_Counts).remote()
    bar = console.progress(total, desc, unit=unit, initial=initial)
    stop = threading.Event()

    def show() -> None:
        n, info = ray.get(actor.get.remote())
        if initial + n > bar.n:
            bar.update(initial + n - bar.n)
        if info and info != bar.postfix:
            bar.set_postfix_str(info)
        elif console.is_terminal():         # the elapsed time moves on a terminal; a log gets changes only
            bar.refresh()

    def poll() -> None:
        while not stop.wait(POLL_S):
            try:
                show()
            except Exception:       # the actor or Ray went away: the bar stops moving, the step goes on
                return

    thread = threading.Thread(target=poll, name="fisher-progress", daemon=True)
    thread.start()
    try:
        yield Reporter(actor)
        stop.set()
        thread.join()
        show()
    finally:
        stop.set()
        thread.join()
        bar.close()
        ray.kill(actor)
