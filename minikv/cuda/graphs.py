"""CUDA graphs of decode steps: a step's kernels captured once and replayed with one launch.

A decode step of an 8B model is ~450 kernel launches; from Python they take longer than the GPU
needs to run them. Captured, the step is one `cudaGraphLaunch`. What changes between steps
(token ids, positions, the caches' row info) lives in fixed device buffers that the kernels
read, refreshed before each launch; whatever else a step's launches depend on is its key.

Memory: a graph replays its kernels on the addresses it was captured with. Its buffers come
from a private pool, so no other code is ever handed them; its intermediates, freed after the
capture, are reused only by later captures (graphs replay one at a time, on one stream). The
capture stream is a blocking one, so launches on it are ordered with the default stream's work
before and after.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable


class GraphCache:
    """Captured steps by key, the `size` most recently used kept."""

    def __init__(self, cp, size: int = 8):
        self.cp, self.size = cp, size
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=False)
        self.graphs: OrderedDict = OrderedDict()  # key -> (graph, output)
        self.captures = self.replays = 0  # graphs captured and launches so far (tests read them)

    def run(self, key, step: Callable[[], object]):
        """The output of `step()` (device arrays), replayed from the graph captured for `key`, or
        captured now: step runs once eagerly (kernels compile and load, the pool learns the
        sizes), then under capture. step must be idempotent (a decode step is: it writes the
        same keys and values to the same places). The output is valid until the next replay."""
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(step)
            if len(self.graphs) > self.size:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, out = entry
        graph.launch(self.stream)
        self.replays += 1
        return out

    def _capture(self, step):
        cp = self.cp
        with self.stream, cp.cuda.using_allocator(self.pool.malloc):
            step()
            self.stream.begin_capture()
            try:
                out = step()
            except BaseException:
                self.stream.end_capture()  # leave the stream usable; the step's error is what matters
                raise
            graph = self.stream.end_capture()
        self.captures += 1
        return graph, out

    def clear(self) -> None:
        self.graphs.clear()
        self.pool.free_all_blocks()
