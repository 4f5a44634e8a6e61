"""Every CUDA source compiles for the GPUs users have (Ampere, Ada, Hopper), with every
template variant the wrappers can request instantiated. Runs wherever nvcc is installed
(CI has it); the GPU tests then check what the kernels compute.

Two tiers: the default run compiles every source once for sm_90 (minutes on 2 cores); the
`nvcc_matrix` marker adds the other architectures and the decode kernel's spill check
(`bash tests/run.sh -m nvcc_matrix`), to run before a kernel change lands."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "kernels_cu"
SOURCES = sorted(KERNELS.glob("*.cu"))
ARCHS = [pytest.param(a, marks=pytest.mark.nvcc_matrix) for a in ("sm_80", "sm_86", "sm_89")] + ["sm_90"]
KERNEL_DEF = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)")


def nvcc_or_skip() -> str:
    """nvcc's path; the test skips without it, except in CI, which must have it."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nvcc is not on PATH in CI")
        pytest.skip("nvcc is not installed")
    return nvcc


def test_there_are_sources():
    names = {p.name for p in SOURCES}
    assert {"ops.cu", "attention.cu"} <= names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_compiles(src, arch, tmp_path):
    nvcc = nvcc_or_skip()
    r = subprocess.run([nvcc, f"-arch={arch}", "-ptx", "-std=c++17", f"-I{KERNELS}", "-DMINIKV_INSTANTIATE_ALL",
                        str(src), "-o", str(tmp_path / "out.ptx")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stderr.lower(), r.stderr[-3000:]
    # a template never instantiated is never compiled: every kernel the file defines must be in the PTX
    ptx = (tmp_path / "out.ptx").read_text()
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    missing = [k for k in KERNEL_DEF.findall(src.read_text())
               if not any(e == k or re.match(rf"_Z\d+{k}I", e) for e in entries)]
    assert not missing, f"not compiled (no instantiation under MINIKV_INSTANTIATE_ALL?): {missing}"


@pytest.mark.nvcc_matrix
def test_decode_variants_do_not_spill(tmp_path):
    """Every decode kernel variant the wrapper picks (each method's KernelMethod.groups, either
    block size) keeps its state in registers on sm_90: a spill would put local-memory traffic on
    every key of the hot loop."""
    nvcc = nvcc_or_skip()
    from minikv.cuda import kivi, nqkv, patternkv  # noqa: F401  (each declares its KernelMethod)
    from minikv.cuda.attention import DECODE_WARPS, KERNEL_METHODS

    assert set(KERNEL_METHODS) == {"fp16", "kivi", "nqkv_token", "nqkv_channel", "patternkv"}
    lines, names = ['#include "decode.cu"'], []
    for method in KERNEL_METHODS.values():
        bits = method.decode_bits + method.trial_bits
        for kb in bits:
            for vb in bits:
                ng = method.groups(kb, vb)
                for D in (64, 128):
                    for warps in DECODE_WARPS:
                        args = (D, method.ident, kb, vb, ng, warps)
                        lines.append(f"void* v{len(names)} = (void*)&attend_decode<{', '.join(map(str, args))}>;")
                        names.append(args)
    src = tmp_path / "variants.cu"
    src.write_text("\n".join(lines) + "\n")
    r = subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-std=c++17", f"-I{KERNELS}", "-Xptxas", "-v", str(src),
                        "-o", str(tmp_path / "out.cubin")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # ptxas reports each entry function ("Compiling entry function '_Z13attend_decodeILi128ELi4...'"),
    # then its spills; template arguments appear in the mangled name as ILi<D>ELi<method>E...
    spills, current = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '_Z\d+attend_decodeI((?:Li\d+E)+)E", line)
        if m:
            current = tuple(int(x) for x in re.findall(r"Li(\d+)E", m.group(1)))
        elif "spill stores" in line and current is not None:
            spills[current] = line.strip()
            current = None
    assert set(spills) == set(names), r.stderr[-3000:]
    bad = {n: s for n, s in spills.items() if " 0 bytes spill stores" not in " " + s}
    assert not bad, bad


def test_decode_smem_bytes_mirrors_the_kernel_layout(tmp_path):
    """cuda/attention.py sizes the decode kernel's shared memory (decode_smem_bytes) by mirroring
    DLayout in decode_tiles.cuh: a host program built from the header prints the kernel's sizes."""
    nvcc = nvcc_or_skip()
    from minikv.cuda.attention import DECODE_WARPS, decode_smem_bytes

    cases = [(D, w, pat, mp) for D in (64, 128) for w in DECODE_WARPS for pat in (0, 1) for mp in (64, 256)]
    nq = [(D, w, t) for D in (64, 128) for w in DECODE_WARPS for t in (1, 2)]  # nqkv's lookup tables
    body = "".join(f'    printf("%d\\n", minikv::DLayout<{D}, {w}>::bytes({pat}, {mp}));\n' for D, w, pat, mp in cases)
    body += "".join(f'    printf("%d\\n", minikv::DLayout<{D}, {w}>::bytes_nq({t}));\n' for D, w, t in nq)
    src = tmp_path / "layout.cu"
    src.write_text(f'#include <cstdio>\n#include "decode_tiles.cuh"\nint main() {{\n{body}    return 0;\n}}\n')
    exe = tmp_path / "layout"
    r = subprocess.run([nvcc, "-std=c++17", f"-I{KERNELS}", str(src), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == ([decode_smem_bytes(D, bool(pat), mp, w) for D, w, pat, mp in cases]
                   + [decode_smem_bytes(D, False, 0, w, t) for D, w, t in nq])


def test_gemv_instantiations_match_the_wrapper():
    """The CI compile check builds gemv<M, R> for exactly the pairs CudaOps.gemv launches."""
    from minikv.cuda.ops import GEMV_ROWS, _gemv_w_rows

    built = {(int(m), int(r)) for m, r in re.findall(r"template __global__ void gemv<(\d+), (\d+)>",
                                                     (KERNELS / "gemv.cu").read_text())}
    assert built == {(m, _gemv_w_rows(m)) for m in range(1, GEMV_ROWS + 1)}
