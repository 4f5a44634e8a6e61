"""The wheel carries every package and the CUDA sources; nothing lands at the top level but minikv."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_directory_is_listed():
    st = _pyproject()
    dirs = {pkg: ROOT / path for pkg, path in st["package-dir"].items()}
    found = set()
    for pkg, path in dirs.items():
        for init in path.rglob("__init__.py"):
            rel = init.parent.relative_to(path).parts
            found.add(".".join((pkg, *rel)) if rel else pkg)
    assert found == set(st["packages"]), found ^ set(st["packages"])
    assert all(p == "minikv" or p.startswith("minikv.") for p in st["packages"])


def test_kernel_sources_ship_as_package_data():
    st = _pyproject()
    patterns = st["package-data"]["minikv.kernels_cu"]
    sources = {p.suffix for p in (ROOT / "kernels_cu").iterdir() if p.suffix in (".cu", ".cuh")}
    assert sources and all(f"*{s}" in patterns for s in sources)
