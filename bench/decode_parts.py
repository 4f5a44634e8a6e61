"""Where a patternkv decode step's time goes: time kernels_cu/decode.cu with parts removed.

    python bench/decode_parts.py [bench/kernels.py arguments; default --batch 8 1 --ctx 32768]

Each variant edits the kernel source (restored afterwards) and times it in a fresh process
(bench/kernels.py); the results of a variant are wrong on purpose, only its time counts:
  nohist   no V-pattern histogram atomics        noqc  no q . C_K lookups per key
  notables no per-block pattern tables (q . C_K, H . C_V; the lookups then read garbage: only
           meaningful together with noqc, as in `none`)
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels_cu"
SRC, PAT = KERNELS / "decode.cu", KERNELS / "decode_patterns.cuh"
HIST = [(SRC, "acc.hist_add(e0, p[0], p[1], (uint32_t)((int)(cur.mk << (31 - 2 * gi)) >> 31));", "", 1),
        (SRC, "acc.hist_add(e1, p[2], p[3], (uint32_t)((int)(cur.mk << (30 - 2 * gi)) >> 31));", "", 1)]
QC = [(SRC, "s[gi][0] += c0.x, s[gi][1] += c0.y, s[gi][2] += c1.x, s[gi][3] += c1.y;", "", 1)]
TABLES = [(PAT, "if (p0 < n) {  // warp-uniform", "if (false) {", 1),
          (PAT, "if (p0 >= n) continue;  // warp-uniform", "continue;", 1)]
VARIANTS = {
    "whole": [],
    "nohist": HIST,
    "noqc": QC,
    "nohist+noqc": HIST + QC,
    "none": HIST + QC + TABLES,
}


def main():
    args = sys.argv[1:] or ["--batch", "8", "1", "--ctx", "32768"]
    orig = {f: f.read_text() for f in (SRC, PAT)}
    try:
        for name, edits in VARIANTS.items():
            src = dict(orig)
            for f, old, new, count in edits:
                if src[f].count(old) != count:
                    sys.exit(f"decode_parts: {old!r} is not in {f.name} {count} time(s): update this script")
                src[f] = src[f].replace(old, new)
            for f, text in src.items():
                f.write_text(text)
            out = subprocess.run([sys.executable, str(KERNELS.parent / "bench" / "kernels.py"), "--kv", "patternkv:2",
                                  *args, "--prefill"], capture_output=True, text=True)
            rows = [r for r in out.stdout.splitlines() if r.startswith("| `")] or [out.stderr[-800:]]
            for r in rows:
                print(f"{name:12} {r}", flush=True)
    finally:
        for f, text in orig.items():
            f.write_text(text)


if __name__ == "__main__":
    main()
