"""`minikv kvstats`: per-layer K/V ranges before and after pattern alignment, quantization
error of each method, V residual use and pattern counts (a table; a figure with --plot)."""
from __future__ import annotations

from ..errors import MinikvError
from .args import add_model_args, load
from .perplexity import text_ids

DEFAULT_SPECS = ["kivi:2", "nqkv:2", "patternkv:2"]


def add_parser(sub) -> None:
    p = sub.add_parser("kvstats", help="KV cache diagnostics per layer", description=__doc__)
    add_model_args(p, kv_multi=True)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text whose K/V are examined")
    p.add_argument("--max-tokens", type=int, default=2048, metavar="N", help="tokens to use (default 2048)")
    p.add_argument("--prefill", type=int, default=512, metavar="P", help="prefill length (default 512)")
    p.add_argument("--heads", action="store_true", help="one row per kv head")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a figure (needs matplotlib)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..kv import parse_kv_spec
    from ..kvstats import layer_stats, plot

    specs = args.kv or DEFAULT_SPECS
    for s in specs:
        parse_kv_spec(s)
    pattern_spec = next((s for s in specs if s.startswith("patternkv")), "patternkv:2")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MinikvError("--plot needs matplotlib: pip install 'minikv[plot]'") from None
    model, tok = load(args)
    ids = text_ids(tok, args.text, args.max_tokens)
    stats = layer_stats(model, ids, specs, pattern_spec, args.prefill, args.heads)
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
