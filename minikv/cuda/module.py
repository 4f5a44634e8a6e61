"""Compile the CUDA sources of kernels_cu once per process (CuPy also caches the binaries on
disk) and launch kernels through typed wrappers: CuPy does not check arguments, so every
wrapper checks dtype, shape and contiguity and casts scalars to the C types."""
from __future__ import annotations

import functools
import hashlib
from importlib import resources

import numpy as np

# Quantizer kernels must reproduce the NumPy oracles bit for bit: no FMA contraction there.
EXACT = ("--fmad=false",)


def source_dir() -> str:
    return str(resources.files("minikv.kernels_cu"))


@functools.cache
def headers_digest() -> str:
    """A digest of every header: CuPy's binary cache is keyed by the source string alone, so a
    changed .cuh would otherwise load a stale binary."""
    h = hashlib.sha256()
    for f in sorted((p for p in resources.files("minikv.kernels_cu").iterdir() if p.name.endswith(".cuh")),
                    key=lambda p: p.name):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def module(name: str, name_expressions: tuple[str, ...] = (), options: tuple[str, ...] = ()):
    import cupy

    code = (resources.files("minikv.kernels_cu") / f"{name}.cu").read_text(encoding="utf-8")
    code += f"\n// headers {headers_digest()}\n"
    return cupy.RawModule(code=code, options=("-std=c++17", f"-I{source_dir()}", *options),
                          name_expressions=name_expressions or None)


def kernel(module_name: str, name: str, options: tuple[str, ...] = ()):
    """A kernel by (possibly templated) name, e.g. 'rms_norm<128>'."""
    templated = "<" in name
    mod = module(module_name, (name,) if templated else (), options)
    return mod.get_function(name)


def check(what: str, a, dtype, shape=None):
    """Raise unless `a` is a C-contiguous CuPy array of `dtype` (and `shape`, None = any size)."""
    import cupy

    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{what}: expected a cupy.ndarray, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{what}: expected {np.dtype(dtype)}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what}: must be C-contiguous")
    if shape is not None:
        if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            raise ValueError(f"{what}: expected shape {shape}, got {a.shape}")
    return a


def i32(x) -> np.int32:
    return np.int32(x)


def f32(x) -> np.float32:
    return np.float32(x)
