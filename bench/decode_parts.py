"""Where a decode step's time goes: time kernels_cu/decode.cu with parts removed.

    python bench/decode_parts.py [--kv kivi:2 patternkv:2] [--variants whole,l1,...]
                                 [bench/kernels.py arguments; default --batch 8 1 --ctx 32768]

Each variant edits the kernel sources (restored afterwards) and times them in a fresh process
(bench/kernels.py); the results of a variant are wrong on purpose, only its time counts:
  l1       every warp's codes, V scales and mins come from the storage's first 128 keys (L1
           hits): the same instructions without the memory traffic
  nokeys   no quantized keys: the launch, prologue, fp16 segments and merges alone
  nowin    the fp16 window and this step's keys skipped
  nomerge  the last block of a kv head does not merge the splits
patternkv only:
  nohist   no V-pattern histogram atomics        noqc  no q . C_K lookups per key
  notables no per-block pattern tables (q . C_K, H . C_V; the lookups then read garbage: only
           meaningful together with noqc, as in `nopat`)
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels_cu"
SRC, PAT, STEPS = KERNELS / "decode.cu", KERNELS / "decode_patterns.cuh", KERNELS / "decode_steps.cuh"
HIST = [(SRC, "acc.hist_add(e0, p[0], p[1], (uint32_t)((int)(cur.mk << (31 - 2 * gi)) >> 31));", ""),
        (SRC, "acc.hist_add(e1, p[2], p[3], (uint32_t)((int)(cur.mk << (30 - 2 * gi)) >> 31));", "")]
QC = [(SRC, "s[gi][0] = c0.x, s[gi][1] = c0.y, s[gi][2] = c1.x, s[gi][3] = c1.y;", "")]
TABLES = [(PAT, "if (p0 < n) {  // warp-uniform", "if (false) {"),
          (PAT, "if (p0 >= n) continue;  // warp-uniform", "continue;")]
_LOAD = "        const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;\n#pragma unroll\n        for (int q = 0; q < NG; ++q) {"
VARIANTS = {  # name: (the methods it applies to, or None for all; [(file, old, new)], each old once)
    "whole": (None, []),
    "l1": (None, [(STEPS, _LOAD, _LOAD.replace("\n#pragma", "\n        tok &= 127, bit &= 127;\n#pragma", 1))]),
    "nokeys": (None, [(SRC, "qz = QUANT ? clip(whi - t_sink, 0, t_chunk) * TILE : 0;", "qz = qa;")]),
    "nowin": (None, [(SRC, "if (wk_a < wk_z) dense(", "if (false) dense("),
                     (SRC, "if (st_a < st_z) dense(", "if (false) dense(")]),
    "nomerge": (None, [(SRC, "        merge_splits<D, DW>(o_part", "        if (n_chunks_cap < 0) merge_splits<D, DW>(o_part")]),
    "nohist": ("patternkv", HIST),
    "noqc": ("patternkv", QC),
    "nopat": ("patternkv", HIST + QC + TABLES),
}


def edited(name: str, orig: dict) -> dict:
    """The sources with variant `name` applied (orig: path -> text)."""
    src = dict(orig)
    for f, old, new in VARIANTS[name][1]:
        if src[f].count(old) != 1:
            sys.exit(f"decode_parts: {old!r} is not in {f.name} exactly once: update this script")
        src[f] = src[f].replace(old, new)
    return src


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", nargs="+", default=["patternkv:2"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args, rest = ap.parse_known_args()
    rest = rest or ["--batch", "8", "1", "--ctx", "32768"]
    orig = {f: f.read_text() for f in (SRC, PAT, STEPS)}
    try:
        for name in args.variants.split(","):
            only = VARIANTS[name][0]
            kv = [k for k in args.kv if only is None or k.startswith(only)]
            if not kv:
                continue
            for f, text in edited(name, orig).items():
                f.write_text(text)
            out = subprocess.run([sys.executable, str(KERNELS.parent / "bench" / "kernels.py"), "--kv", *kv,
                                  *rest, "--prefill"], capture_output=True, text=True)
            rows = [r for r in out.stdout.splitlines() if r.startswith("| `") or "copy bandwidth" in r]
            for r in rows or [out.stderr[-800:]]:
                print(f"{name:8} {r}", flush=True)
    finally:
        for f, text in orig.items():
            f.write_text(text)


if __name__ == "__main__":
    main()
