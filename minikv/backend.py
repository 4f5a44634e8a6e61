"""The array backend, chosen once per process run: NumPy on the CPU or CuPy on a GPU.

Everything above this layer takes a `Backend` and uses `backend.xp` instead of importing
numpy/cupy itself, so one model code path serves both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from .errors import MinikvError


@dataclass(frozen=True)
class Backend:
    name: str  # "cpu" | "cuda"
    xp: ModuleType  # numpy or cupy
    dtype: np.dtype  # weights, activations fed to matmuls and the fp16 KV cache
    ops: object = field(default=None, compare=False)  # minikv.ops.ArrayOps for this backend

    @property
    def is_gpu(self) -> bool:
        return self.name == "cuda"

    def asarray(self, a, dtype=None):
        """Host (or device) array -> this backend's array."""
        return self.xp.asarray(a, dtype=dtype)

    def host_buffer(self, n: int, dtype) -> np.ndarray:
        """A host array of n values that uploads asynchronously (page-locked on the GPU)."""
        if not self.is_gpu or not n:
            return np.zeros(n, dtype)
        import cupyx

        return cupyx.zeros_pinned(n, dtype)

    def to_host(self, a) -> np.ndarray:
        return a.get() if self.is_gpu else np.asarray(a)

    def readback(self, slots: int = 2) -> "Readback":
        return Readback(self, slots)

    def memory_free(self) -> int | None:
        """Bytes free where this backend allocates: the GPU's free memory, or the host's available
        memory (None where the system does not say)."""
        if self.is_gpu:
            return int(self.xp.cuda.runtime.memGetInfo()[0])
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None

    def synchronize(self) -> None:
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


class Readback:
    """Small device arrays (drawn ids) copied to the host, each copy queued right behind the work
    that produces it: `wait(ticket)` returns once that work is done, not after everything queued
    since, so a decode loop reads id n while the GPU runs step n + 1 (a plain `.get()` would wait
    for step n + 1 too). Up to `slots` copies may be in flight; a ticket is read once, before its
    slot comes round again."""

    NBYTES = 8192  # per slot: ids of up to 1024 rows (int64)

    def __init__(self, backend: Backend, slots: int = 2):
        self.gpu, self.turn = backend.is_gpu, 0
        self.host = [backend.host_buffer(self.NBYTES, np.uint8) for _ in range(slots)]
        if self.gpu:
            self.cp = cp = backend.xp
            self.events = [cp.cuda.Event(block=False, disable_timing=True) for _ in range(slots)]
        self.held: list = [None] * slots  # the host array each slot hands out

    def start(self, a) -> int:
        """Queue a's copy to the host (a: a device or host array of at most NBYTES); returns its ticket."""
        t, self.turn = self.turn, (self.turn + 1) % len(self.host)
        if not self.gpu:
            self.held[t] = np.array(a)
            return t
        if a.nbytes > self.NBYTES:
            raise ValueError(f"readback: {a.nbytes} bytes, at most {self.NBYTES}")
        if not a.flags.c_contiguous:
            raise ValueError("readback: a contiguous array is needed")
        out = self.host[t][:a.nbytes].view(a.dtype).reshape(a.shape)  # pinned: the copy is asynchronous
        rt = self.cp.cuda.runtime  # on the current stream, behind the work that wrote `a`
        rt.memcpyAsync(out.ctypes.data, a.data.ptr, a.nbytes, rt.memcpyDeviceToHost, self.cp.cuda.get_current_stream().ptr)
        self.events[t].record()
        self.held[t] = out
        return t

    def wait(self, ticket: int) -> np.ndarray:
        """The array of `ticket`, once its copy is done."""
        if self.gpu:
            self.events[ticket].synchronize()
        return self.held[ticket]


def _cuda_available():
    """Return the cupy module if it imports and sees a GPU, else an explanation string."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'minikv[cuda12]' or 'minikv[cuda13]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU is visible"
    except Exception as e:  # noqa: BLE001 - cupy raises driver-specific types
        return f"CUDA is not usable ({type(e).__name__}: {e})"
    return cupy


DTYPES = ("auto", "float16", "float32")


def get_backend(device: str = "auto", dtype: str = "auto", threads: int | None = None) -> Backend:
    """device: "auto" (GPU if CuPy sees one, else CPU), "cpu" or "cuda". dtype: the compute
    dtype, "auto" (float16 on the GPU, float32 on the CPU), "float16" (GPU only) or "float32".
    The GPU in float32 runs the model as the CPU does (array ops, reference attention; the
    quantizers keep their kernels): slower, for checking numbers against the CPU.
    threads: the CPU's BLAS threads (default: the physical cores; see cpu_threads)."""
    from .cpu_threads import physical_cores
    from .ops import CpuOps

    if threads is not None and threads < 1:
        raise MinikvError(f"--threads {threads}: use 1 or more (default: the {physical_cores()} physical cores)")
    if device not in ("auto", "cpu", "cuda"):
        raise MinikvError(f"unknown --device {device!r}: use auto, cpu or cuda")
    if dtype not in DTYPES:
        raise MinikvError(f"unknown --dtype {dtype!r}: use {', '.join(DTYPES)}")
    if device in ("auto", "cuda"):
        cp = _cuda_available()
        if not isinstance(cp, str):
            from .cuda.ops import CudaOps

            dt = np.float32 if dtype == "float32" else np.float16
            return Backend("cuda", cp, np.dtype(dt), CudaOps(cp))
        if device == "cuda":
            raise MinikvError(f"--device cuda: {cp}; use --device cpu to run on the CPU")
    if dtype == "float16":
        raise MinikvError("--dtype float16 needs a GPU (the CPU computes in float32); use --dtype float32 or auto")
    # CPU computes in float32 (NumPy has no fast fp16 matmul).
    return Backend("cpu", np, np.dtype(np.float32), CpuOps(threads))
