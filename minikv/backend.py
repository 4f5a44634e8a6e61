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
