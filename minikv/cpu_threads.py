"""BLAS threads on the CPU: `-t` threads (default: the physical cores) for matrix products of
many rows (a prompt), and for matrix-vector products (a decode step) whichever of 1 and `-t`
has been faster lately, timed as they run.

Why race: a decode step's products are memory-bound. On an idle machine two cores pull more
bandwidth than one (SmolLM2 on 2 cores: 38 tokens/s against 24), but when anything else wants
a core, OpenBLAS's second thread waits for it on every product, and decode drops to 2-14
tokens/s while one thread keeps 15-23 (bench/RESULTS.md). Which case holds changes while a
model runs, so decode steps keep timing both counts.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

MATVEC_ROWS = 16  # forward passes of at most this many token rows race 1 thread against `threads`


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (llama.cpp's default thread count)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + "/" + (topo / "core_id").read_text().strip())
        except OSError:  # no sysfs topology (macOS, some containers): count logical CPUs
            cores.add(str(c))
    return max(1, len(cores))


class Race:
    """Two thread counts, timed as they run. The faster lately (an average of recent times)
    runs; the other is tried again (its newest time replacing its old one) after `gap` calls:
    32 after a switch, 1024 after a try that lost, so a count that is clearly worse costs next
    to nothing. A try that wins, or the running count slowing down past the other's last time,
    switches at once."""

    MIN_GAP, MAX_GAP = 32, 1024

    def __init__(self, best: int, other: int):
        self.best, self.other = best, other
        self.seconds: dict[int, float] = {}
        self.gap, self.calls = self.MIN_GAP, 0

    def pick(self) -> int:
        self.calls += 1
        if self.best in self.seconds and (self.other not in self.seconds or self.calls >= self.gap):
            self.calls = 0
            return self.other
        return self.best

    def record(self, n: int, seconds: float) -> None:
        old = self.seconds.get(n)  # a try replaces the other's time: up to 1024 passes old, it is stale
        self.seconds[n] = seconds if old is None or n == self.other else 0.7 * old + 0.3 * seconds
        if len(self.seconds) < 2:
            return
        if self.seconds[self.other] < self.seconds[self.best]:  # a try that won, or the best slowing down
            self.best, self.other, self.gap = self.other, self.best, self.MIN_GAP
        elif n == self.other:
            self.gap = self.MAX_GAP


class BlasThreads:
    """Sets the BLAS thread count for each forward pass by its number of token rows."""

    def __init__(self, threads: int | None = None):
        """threads: None = the physical cores, or fewer if the BLAS was started with fewer
        (OPENBLAS_NUM_THREADS and the like are honoured)."""
        from threadpoolctl import ThreadpoolController

        # Every BLAS NumPy may have loaded (normally one OpenBLAS); empty if none is known.
        self._libs = ThreadpoolController().select(user_api="blas").lib_controllers
        self.threads = threads or min([physical_cores()] + [lib.num_threads for lib in self._libs])
        self._current = None
        self.races: dict[int, Race] = {}  # rows -> the race of passes of that many rows

    @contextmanager
    def forward(self, rows: int):
        """One forward pass: on `threads` threads if it has more than MATVEC_ROWS rows, else on
        the count winning the race of passes of its size. A whole pass is timed, not each product: after a product
        on two threads OpenBLAS's second thread spins for a while, and on a busy machine that
        slows the products after it, which they alone would not show."""
        if rows > MATVEC_ROWS or self.threads == 1 or not self._libs:
            self._use(self.threads)
            yield
            return
        race = self.races.get(rows)
        if race is None:  # the first pass of a size pays one-time costs (pages touched): not timed
            self.races[rows] = Race(1, self.threads)
            self._use(self.threads)
            yield
            return
        n = race.pick()
        self._use(n)
        t = time.perf_counter()
        yield
        race.record(n, time.perf_counter() - t)  # not reached if the pass raised

    def _use(self, n: int) -> None:
        if n != self._current:  # a library call under a microsecond, but none when nothing changes
            for lib in self._libs:
                lib.set_num_threads(n)
            self._current = n

    def current(self) -> list[int]:
        """What each BLAS library is set to now (for tests)."""
        return [lib.get_num_threads() for lib in self._libs]
