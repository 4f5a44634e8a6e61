"""`minikv convert`: a Hugging Face checkpoint directory or a GGUF file -> a minikv model
directory (config.json, safetensors with a minikv metadata header, tokenizer files), which
is still a valid HF checkpoint directory."""
from __future__ import annotations

from pathlib import Path

from minikv.errors import MinikvError

from .output import DTYPES, WeightsWriter, atomic_dir, write_json


def open_source(src: Path):
    try:
        if not src.exists():
            raise MinikvError(f"{src}: no such file or directory")
        if src.is_file():
            with open(src, "rb") as f:
                magic = f.read(4)
    except OSError as e:
        raise MinikvError(f"{src}: cannot read ({e.strerror})") from None
    if src.is_file():
        if magic != b"GGUF":
            raise MinikvError(f"{src}: not a GGUF file (no GGUF magic); pass a .gguf file or a "
                              "Hugging Face checkpoint directory")
        from .gguf_source import GGUFSource

        return GGUFSource(src)
    from .hf_source import HFSource

    return HFSource(src)


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, force: bool = False,
            on_open=lambda: None) -> Path:
    """Convert `src` into the model directory `dst`; returns `dst`. Nothing is left at `dst`
    (or beside it) unless the conversion completes. `on_open()` runs once `src` has been read
    and checked, before the (long) conversion starts."""
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise MinikvError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    try:
        same = dst.exists() and dst.resolve() == src.resolve()
    except OSError as e:  # e.g. a parent directory this user may not enter
        raise MinikvError(f"{dst}: cannot be reached ({e.strerror}); choose another destination") from None
    if same:
        raise MinikvError(f"{dst}: the destination is the source; choose another directory")
    source = open_source(src)
    on_open()
    dtype = dtype or source.default_dtype
    with atomic_dir(dst, force) as tmp:
        writer = WeightsWriter(tmp, source.plan(), dtype, source.name)
        for name, _ in source.plan():
            writer.write(name, source.tensor(name))
        writer.close()
        for fname, obj in source.files(DTYPES[dtype][2]).items():
            write_json(tmp / fname, obj)
        if hasattr(source, "copy_extras"):
            source.copy_extras(tmp)
    return dst
