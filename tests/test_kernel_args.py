"""The fused attention's host side without a GPU: each method's KernelStorage checks its arrays and
lays them out as the kernels' storage arguments, and FusedAttention picks the kernel (decode.cu or
attention.cu, the method's id and key groups) and passes them in order. A stand-in CuPy (NumPy
arrays with device pointers) and a recording kernel take the GPU's place."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

H100 = {"MultiProcessorCount": 132, "MaxSharedMemoryPerBlockOptin": 232448,
        "MaxSharedMemoryPerMultiprocessor": 233472, "MaxRegistersPerMultiprocessor": 65536}
STORAGE = slice(20, 37)  # the 17 storage arguments, after q, its strides, the row info, sinks, window, step


class DevArray(np.ndarray):
    """A host array that answers as a device one does (`.data.ptr`)."""

    @property
    def data(self):
        return SimpleNamespace(ptr=self.ctypes.data)


def dev(shape, dtype):
    return np.zeros(shape, dtype).view(DevArray)


class Recorder:
    num_regs, max_dynamic_shared_size_bytes = 96, 0

    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def __call__(self, grid, block, args, shared_mem=0):
        self.calls.append((self.name, args))


@pytest.fixture
def fused(monkeypatch):
    """(FusedAttention for head_dim 128, the launches it made)."""
    fake = SimpleNamespace(ndarray=DevArray, zeros=dev, empty=dev,
                           asarray=lambda a, dtype=None: np.asarray(a, dtype).view(DevArray),
                           cuda=SimpleNamespace(Device=lambda: SimpleNamespace(attributes=H100)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    from minikv.cuda import attention

    calls = []
    monkeypatch.setattr(attention, "kernel", lambda module, name: Recorder(calls, name))
    return attention.FusedAttention(fake, 128, max_heads=8), calls


def run(fused, storage, chunks=4, patterns=0, T=1):
    """One step of batch 1, 8 kv heads, 32 query heads; returns (kernel name, storage arguments, mp)."""
    fa, calls = fused
    B, Hkv, D = 1, 8, 128
    rowinfo = np.array([[0, chunks, 10, T, 0, patterns]], np.int32)
    win = (dev((B, Hkv, 128, D), np.float16), dev((B, Hkv, 128, D), np.float16))
    step = (dev((B, Hkv, T, D), np.float16), dev((B, Hkv, T, D), np.float16))
    fa(dev((B, 4 * Hkv, T, D), np.float16), rowinfo, 0.1, None, win, step, storage, 16)
    name, args = [c for c in calls if c[0] != "attend_reduce"][-1]  # attention.cu's splits merge in a second launch
    return name, args[STORAGE], int(args[STORAGE.stop])


def kivi_arrays(kb=2, vb=2, NC=4, G=64, D=128):
    B, H = 1, 8
    return dict(kbits=kb, vbits=vb, kc=dev((B, H, NC, G, D * kb // 8), np.uint8),
                ks=dev((B, H, NC, D), np.float16), km=dev((B, H, NC, D), np.float16),
                vc=dev((B, H, NC * G, D * vb // 8), np.uint8), vs=dev((B, H, NC * G, 1), np.float16),
                vm=dev((B, H, NC * G, 1), np.float16), n_chunks_cap=NC, G=G)


def test_kivi_decodes_in_the_register_tile_kernel(fused):
    from minikv.cuda.kivi import UniformStorage

    a = kivi_arrays()
    name, args, mp = run(fused, UniformStorage(**a))
    assert name == "attend_decode<128, 1, 2, 2, 4, 8>"  # kivi's id, 4 key groups a step, 8 warps
    assert args[:6] == tuple(a[k] for k in ("kc", "ks", "km", "vc", "vs", "vm"))
    assert [int(x) for x in args[6:9]] == [4, 64, 64] and int(args[16]) == 0 and mp == 0
    null = fused[0]._nulls
    assert args[9:16] == (null.f, null.f, null.b, null.b, null.b, null.h, null.h)


def test_three_bit_codes_and_prefill_rows_go_to_the_shared_memory_kernel(fused):
    from minikv.cuda.kivi import UniformStorage

    assert run(fused, UniformStorage(**kivi_arrays(kb=3)))[0] == "attend<128, 1, 3, 2, 16>"
    assert run(fused, UniformStorage(**kivi_arrays()), T=16)[0] == "attend<128, 1, 2, 2, 64>"


def test_three_bit_codes_decode_in_decode_cu_on_trial_only(fused):
    """3-bit codes (held as 4 in registers) go to decode.cu only when the trial is asked for."""
    from minikv.cuda.kivi import UniformStorage

    fused[0].trial = True
    assert run(fused, UniformStorage(**kivi_arrays(kb=3)))[0] == "attend_decode<128, 1, 3, 2, 4, 8>"
    assert run(fused, UniformStorage(**kivi_arrays(kb=4, vb=3)))[0] == "attend_decode<128, 1, 4, 3, 2, 8>"


def test_a_step_without_chunks_reads_fp16_only(fused):
    from minikv.cuda.kivi import UniformStorage

    name, args, _ = run(fused, UniformStorage(**kivi_arrays()), chunks=0)
    assert name == "attend_decode<128, 0, 16, 16, 1, 8>"
    assert args[0] is fused[0]._nulls.b


def test_patternkv_passes_its_tables_sized_by_the_fullest_sequence(fused):
    from minikv.cuda.patternkv import PatternStorage

    a, T = kivi_arrays(), 4 * 64
    pats = dict(kidx=dev((1, 8, T), np.uint8), vidx=dev((1, 8, T), np.uint8), vmask=dev((1, 8, T // 8), np.uint8),
                kpat=dev((1, 8, 256, 128), np.float16), vpat=dev((1, 8, 256, 128), np.float16), mmax=256)
    name, args, mp = run(fused, PatternStorage(**a, **pats), patterns=70)
    assert name.startswith("attend_decode<128, 4, 2, 2, 4, ") and mp == 128
    assert args[11:16] == tuple(pats[k] for k in ("kidx", "vidx", "vmask", "kpat", "vpat")) and int(args[16]) == 256


@pytest.mark.parametrize("channel,bs,expect", [(False, 32, "attend_decode<128, 2, 2, 2, 2, "),
                                               (False, 16, "attend<128, 2, 2, 2, 16>"),  # blocks shorter than a lane's run
                                               (True, 32, "attend<128, 3, 2, 2, 16>")])
def test_nqkv_picks_its_kernel_by_block_axis_and_size(fused, channel, bs, expect):
    from minikv.cuda.nqkv import NormalStorage

    T, G = 4 * 64, 64
    ka = (1, 8, 4, G // bs, 128) if channel else (1, 8, T, 128 // bs)
    st = NormalStorage(kbits=2, vbits=2, kc=dev((1, 8, T, 32), np.uint8), ka=dev(ka, np.float16),
                       vc=dev((1, 8, T, 32), np.uint8), va=dev((1, 8, T, 128 // bs), np.float16), n_chunks_cap=4,
                       G=G, bs=bs, levels_k=dev(4, np.float32), levels_v=dev(4, np.float32), channel=channel)
    name, args, _ = run(fused, st)
    assert name.startswith(expect)
    assert args[1] is st.ka and args[2] is fused[0]._nulls.h and int(args[8]) == bs and args[9] is st.levels_k


def test_storage_is_checked_when_built(fused):
    from minikv.cuda.kivi import UniformStorage

    a = kivi_arrays()
    with pytest.raises(TypeError, match="kivi storage ks"):
        UniformStorage(**{**a, "ks": dev(a["ks"].shape, np.float32)})
    with pytest.raises(ValueError, match="kivi storage vc"):
        UniformStorage(**{**a, "vc": dev((1, 8, 256, 64), np.uint8)})  # 4-bit rows for 2-bit codes
    with pytest.raises(ValueError, match="said 8 of 64"):
        UniformStorage(**{**a, "n_chunks_cap": 8})


@pytest.mark.parametrize("spec", ["kivi:2,g=64", "patternkv:2,g=64", "nqkv:2,g=64"])
def test_a_cache_builds_its_kernel_storage_once_and_a_row_view_its_own(fused, monkeypatch, spec):
    """The per-layer storages a GPU cache hands the kernel are built with it over its own arrays,
    and a row view's over the view's rows (not the parent's)."""
    from minikv.backend import Backend
    from minikv.kv import KVGeometry, make_cache

    monkeypatch.setitem(sys.modules, "cupyx", SimpleNamespace(zeros_pinned=np.zeros))
    be = Backend("cuda", sys.modules["cupy"], np.dtype(np.float16))
    cache = make_cache(spec, KVGeometry(2, 8, 4, 128, 0.1), 4, 256, be)
    st = cache.kernel_storages
    assert len(st) == 2 and all(s.kc is cache.kc[layer] for layer, s in enumerate(st))
    with cache.row_range(1, 3) as view:
        for layer, s in enumerate(view.kernel_storages):
            assert s.kc.shape[0] == 2 and s.kc.ctypes.data == cache.kc[layer][1].ctypes.data
            assert s.kc is view.kc[layer]
