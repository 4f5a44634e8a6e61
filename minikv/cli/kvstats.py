"""`minikv kvstats`: per-layer K/V ranges before and after pattern alignment, quantization
error of each method, V residual use and pattern counts (a table; a figure with --plot)."""
from __future__ import annotations

from pathlib import Path

from ..errors import MinikvError
from ..progress import Progress
from .args import add_model_args, load
from .perplexity import text_ids

DEFAULT_SPECS = ["kivi:2", "nqkv:2", "patternkv:2"]
DEFAULT_TOKENS = 2048


def add_parser(sub) -> None:
    p = sub.add_parser("kvstats", help="KV cache diagnostics per layer", description=__doc__)
    add_model_args(p, kv_multi=True, ctx_help=None, ubatch_help=None)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text whose K/V are examined")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help=f"tokens to use (default {DEFAULT_TOKENS}, or the model's maximum if smaller)")
    p.add_argument("--prefill", type=int, default=512, metavar="P", help="prefill length (default 512)")
    p.add_argument("--heads", action="store_true", help="one row per kv head")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a figure (needs matplotlib)")
    p.set_defaults(func=run)


def check_plot_path(path: str) -> None:
    """Fail before the computation, not after it: matplotlib present, a format it writes, a
    directory that exists."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise MinikvError("--plot needs matplotlib: pip install 'minikv[plot]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in formats:
        raise MinikvError(f"--plot {path}: unknown image format {ext or '(none)'!r}; use a name ending in "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        raise MinikvError(f"--plot {path}: the directory {parent} does not exist")


def run(args) -> int:
    from ..kv import parse_kv_spec
    from ..kvstats import layer_stats, plot

    specs = args.kv or DEFAULT_SPECS
    for s in specs:
        if parse_kv_spec(s).method == "fp16":
            raise MinikvError(f"--kv {s}: kvstats compares quantized caches with the fp16 values; "
                              f"give quantized methods (e.g. {', '.join(DEFAULT_SPECS)})")
    pattern_spec = next((s for s in specs if s.startswith("patternkv")), "patternkv:2")
    if args.plot:
        check_plot_path(args.plot)
    model, tok, _ = load(args)
    n_max = model.cfg.max_position_embeddings
    if args.max_tokens is not None and args.max_tokens > n_max:
        raise MinikvError(f"--max-tokens {args.max_tokens} exceeds the model's max_position_embeddings ({n_max})")
    ids = text_ids(tok, args.text, args.max_tokens or min(DEFAULT_TOKENS, n_max))
    if not 1 <= args.prefill < len(ids):
        raise MinikvError(f"--prefill {args.prefill}: use 1 to {len(ids) - 1} (fewer than the {len(ids)} "
                          "tokens examined)")
    steps = len(dict.fromkeys([pattern_spec, *specs])) + model.kv_geometry.n_layers
    with Progress(steps, "kvstats") as bar:
        stats = layer_stats(model, ids, specs, pattern_spec, args.prefill, args.heads, progress=bar.advance)
    head = (f"{'layer':>5} {'head':>4} {'K range':>8} {'K-pat':>7} {'V range':>8} {'V-pat':>7} {'V res':>6} "
            f"{'pats':>4}  " + " ".join(f"{'errK ' + s:>14} {'errV ' + s:>14}" for s in specs))
    print(f"{len(ids)} tokens; ranges and V residual use from {pattern_spec}; errors are ||x^ - x|| / ||x||")
    print(head)
    for s in stats:
        h = "all" if s.head is None else str(s.head)
        errs = " ".join(f"{s.k_err[x]:14.4f} {s.v_err[x]:14.4f}" for x in specs)
        print(f"{s.layer:5d} {h:>4} {s.k_range:8.3f} {s.k_range_aligned:7.3f} {s.v_range:8.3f} "
              f"{s.v_range_aligned:7.3f} {s.v_resid:6.2f} {s.patterns:4d}  {errs}")
    if args.plot:
        plot(stats, args.plot, f"{model.cfg.model_type} ({len(ids)} tokens): KV diagnostics")
        print(f"figure: {args.plot}")
    return 0
