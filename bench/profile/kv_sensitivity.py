"""How much a KV method's perplexity moves when only the activations' rounding changes.

    python3 bench/profile/kv_sensitivity.py [MODEL_DIR] --text FILE --max-tokens 4096 --kv fp16 --kv kivi:2 ...

Runs each method twice on the CPU: float32 matmul inputs (minikv's CPU path), then with one
rounding change. `--change fp16` rounds the matmul inputs to fp16 (the GPU's float16 path);
`--change ulp` multiplies each matmul output by 1 + 2^-24 * N(0, 1), a float32 rounding-level
change such as another BLAS's summation order makes (the GPU's float32 path). The difference is
the numerical noise of the method's perplexity on that text: low-bit codes and pattern choices
flip and the flips compound.
"""
from __future__ import annotations

import contextlib
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/: the shared helpers

from common import load_model, perplexity_parser  # noqa: E402

LABELS = {"fp16": "fp16-rounded inputs", "ulp": "outputs x (1 + 2^-24 N(0,1))",
          "f64": "float64 matmul, rounded to float32"}


@contextlib.contextmanager
def changed_linear(change: str, seed: int = 0):
    """ArrayOps.linear with one rounding change (see the module doc) while the block runs."""
    from minikv.ops import ArrayOps

    linear = ArrayOps.linear
    rng = np.random.default_rng(seed)

    def fp16(self, x, w, b=None):
        return linear(self, x.astype(np.float16).astype(np.float32), w, b)

    def ulp(self, x, w, b=None):
        y = linear(self, x, w, b)
        return y * (1 + 2.0 ** -24 * rng.standard_normal(y.shape)).astype(np.float32)

    def f64(self, x, w, b=None):
        return linear(self, x.astype(np.float64), w.astype(np.float64), b).astype(np.float32)

    ArrayOps.linear = {"fp16": fp16, "ulp": ulp, "f64": f64}[change]
    try:
        yield
    finally:
        ArrayOps.linear = linear


def main():
    from minikv.cli.perplexity import text_ids
    from minikv.perplexity import perplexity

    ap = perplexity_parser(__doc__)
    ap.add_argument("--text", required=True)
    ap.add_argument("--kv", action="append", required=True)
    ap.add_argument("--change", choices=list(LABELS), default="fp16")
    ap.add_argument("--seed", type=int, default=0, help="of the --change ulp noise")
    args = ap.parse_args()
    args.device = "cpu"
    model, tok = load_model(args)
    ids = text_ids(tok, args.text, args.max_tokens)
    base = {s: perplexity(model, ids, s).ppl for s in args.kv}
    print(f"| kv | float32 | {LABELS[args.change]} | change |")
    print("| --- | --- | --- | --- |")
    for s in args.kv:
        with changed_linear(args.change, args.seed):  # the same noise for every method
            p = perplexity(model, ids, s).ppl
        print(f"| `{s}` | {base[s]:.3f} | {p:.3f} | {100 * (p / base[s] - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
