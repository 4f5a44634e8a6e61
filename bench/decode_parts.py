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

SRC = pathlib.Path(__file__).resolve().parents[1] / "kernels_cu" / "decode.cu"
HIST = ["acc.hist_add(e0, p[0], p[1], (uint32_t)((int)(cur.mk << (31 - 2 * gi)) >> 31));",
        "acc.hist_add(e1, p[2], p[3], (uint32_t)((int)(cur.mk << (30 - 2 * gi)) >> 31));"]
QC = ["s[gi][0] += c0.x, s[gi][1] += c0.y, s[gi][2] += c1.x, s[gi][3] += c1.y;"]
TABLES = [("p0 < info.patterns; p0 += DW * 16", "p0 < 0; p0 += DW * 16", 2)]
VARIANTS = {
    "whole": [],
    "nohist": [(h, "", 1) for h in HIST],
    "noqc": [(h, "", 1) for h in QC],
    "nohist+noqc": [(h, "", 1) for h in HIST + QC],
    "none": [(h, "", 1) for h in HIST + QC] + TABLES,
}


def main():
    args = sys.argv[1:] or ["--batch", "8", "1", "--ctx", "32768"]
    orig = SRC.read_text()
    try:
        for name, edits in VARIANTS.items():
            src = orig
            for old, new, count in edits:
                if src.count(old) != count:
                    sys.exit(f"decode_parts: {old!r} is not in decode.cu {count} time(s): update this script")
                src = src.replace(old, new)
            SRC.write_text(src)
            out = subprocess.run([sys.executable, str(SRC.parents[1] / "bench" / "kernels.py"), "--kv", "patternkv:2",
                                  *args, "--prefill"], capture_output=True, text=True)
            rows = [r for r in out.stdout.splitlines() if r.startswith("| `")] or [out.stderr[-800:]]
            for r in rows:
                print(f"{name:12} {r}", flush=True)
    finally:
        SRC.write_text(orig)


if __name__ == "__main__":
    main()
