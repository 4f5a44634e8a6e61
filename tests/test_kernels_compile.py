"""Every CUDA source compiles for the GPUs users have (Ampere, Ada, Hopper), with every
template variant the wrappers can request instantiated. Runs wherever nvcc is installed
(CI has it); the GPU tests then check what the kernels compute."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "kernels_cu"
SOURCES = sorted(KERNELS.glob("*.cu"))
ARCHS = ["sm_80", "sm_86", "sm_89", "sm_90"]


def test_there_are_sources():
    names = {p.name for p in SOURCES}
    assert {"ops.cu", "attention.cu"} <= names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_compiles(src, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nvcc is not on PATH in CI")
        pytest.skip("nvcc is not installed")
    r = subprocess.run([nvcc, f"-arch={arch}", "-ptx", "-std=c++17", f"-I{KERNELS}", "-DMINIKV_INSTANTIATE_ALL",
                        str(src), "-o", str(tmp_path / "out.ptx")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stderr.lower(), r.stderr[-3000:]
