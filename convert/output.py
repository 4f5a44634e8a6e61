"""Writing a minikv model directory atomically: everything goes into a temporary directory
next to DST, which is renamed into place only when complete."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from minikv.errors import MinikvError
from minikv.progress import Progress
from minikv.safetensors_io import SafetensorsWriter, float32_to_bf16_bits

FORMAT_VERSION = "1"
DTYPES = {"f16": ("F16", np.float16, "float16"), "bf16": ("BF16", np.uint16, "bfloat16"),
          "f32": ("F32", np.float32, "float32")}
SHARD_BYTES = 2 << 30  # shards of at most ~2 GiB (HF's default is 5 GB; smaller is kinder to mmap)
FP16_MAX = 65504.0


def to_stored(a: np.ndarray, dtype: str) -> tuple[np.ndarray, int]:
    """float array -> (stored bits in `dtype`, how many values had to be clipped to fit)."""
    if dtype == "bf16":
        return float32_to_bf16_bits(a.astype(np.float32, copy=False)), 0
    if dtype == "f16":
        over = int(np.count_nonzero(np.abs(a) > FP16_MAX))
        a = np.clip(a, -FP16_MAX, FP16_MAX) if over else a
        return a.astype(np.float16), over
    return a.astype(np.float32, copy=False), 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_dir(dst: Path, force: bool):
    """Yield a fresh temporary directory beside `dst`; on success it becomes `dst`, on any
    error or interruption (Ctrl-C, SIGTERM) it is removed and `dst` is left untouched."""
    dst = dst.absolute()
    if dst.exists() and not force:
        raise MinikvError(f"{dst} already exists; pass --force to replace it")
    if dst.exists() and not dst.is_dir():
        raise MinikvError(f"{dst} is a file, not a model directory; choose another destination")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{dst.name}.partial-"
        for stale in dst.parent.glob(prefix + "*"):  # left by a conversion that was SIGKILLed
            pid = stale.name[len(prefix):].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=dst.parent))
    except OSError as e:
        raise _unwritable(dst, e) from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the model directory gets normal permissions
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_term)
        yield tmp
        if dst.exists():  # --force: swap, then drop the old one
            trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            try:
                os.replace(dst, trash / "x")
            finally:
                if not (trash / "x").exists():
                    trash.rmdir()
            os.replace(tmp, dst)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, a directory made read-only or immutable meanwhile
            raise _unwritable(dst, e) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)


def _unwritable(dst: Path, e: OSError) -> MinikvError:
    return MinikvError(f"cannot write {dst}: {e.strerror or e}; choose a destination in a writable "
                       "directory with free space")


class WeightsWriter:
    """Writes named tensors into (sharded) safetensors files with a minikv metadata header,
    tensor by tensor, with a byte progress bar on a terminal."""

    def __init__(self, out: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: str, source: str):
        self.out, self.dtype = out, dtype
        st_dtype, np_dtype, _ = DTYPES[dtype]
        item = np.dtype(np_dtype).itemsize
        shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in plan:
            n = int(np.prod(shape, dtype=np.int64)) * item
            if shards[-1] and size + n > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append((name, st_dtype, shape))
            size += n
        self.total = sum(int(np.prod(s, dtype=np.int64)) * item for _, s in plan)
        meta = {"format": "pt", "minikv_format": FORMAT_VERSION, "minikv_source": source}
        k = len(shards)
        self.files = ["model.safetensors"] if k == 1 else \
            [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self._where = {name: i for i, shard in enumerate(shards) for name, _, _ in shard}
        self._shards, self._meta = shards, meta
        self._writers: dict[int, SafetensorsWriter] = {}
        self.clipped = 0
        self.bar = Progress(self.total, "converting", unit="B")

    def write(self, name: str, values: np.ndarray) -> None:
        """values: float32 (or float16) array; converted to the output dtype here."""
        i = self._where[name]
        if i not in self._writers:
            for j in list(self._writers):  # shards are written in order: close the previous one
                self._writers.pop(j).close()
            self._writers[i] = SafetensorsWriter(self.out / self.files[i], self._shards[i], self._meta)
        bits, over = to_stored(values, self.dtype)
        self.clipped += over
        self._writers[i].write(name, bits)
        self.bar.advance(bits.nbytes, name)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self.bar.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {n: self.files[i] for n, i in self._where.items()}}
            write_json(self.out / "model.safetensors.index.json", index)
        if self.clipped:
            print(f"minikv: {self.clipped} weights beyond float16's range were clipped; "
                  "use --dtype bf16 to keep them", file=sys.stderr)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
