"""Quantized caches behind the cache contract: chunking, sinks, batching, accounting, scoring."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import STORIES
from helpers import rel_err
from minikv.backend import get_backend
from minikv.errors import MinikvError
from minikv.kv import make_cache, parse_kv_spec
from minikv.kvstats import layer_stats
from minikv.models import load_model
from minikv.perplexity import perplexity

CPU = get_backend("cpu")
METHODS = ["kivi:2", "nqkv:2", "patternkv:2", "nqkv:3,kaxis=channel,bs=8", "kivi:3,vbits=4", "kivi:2,vbits=3,sc=8"]


@pytest.fixture(scope="module")
def stories():
    return load_model(STORIES, CPU)


@pytest.fixture(scope="module")
def ids():
    from minikv.tokenizer import Tokenizer
    from conftest import TEXT

    return Tokenizer.from_dir(STORIES).encode((TEXT / "tinystories_valid_fragment.txt").read_text())[:700]


def fp16(x):
    return x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("spec", ["kivi:2,g=16", "patternkv:2,g=16,sink=4", "nqkv:3,g=16,r=40,sink=3",
                                  "kivi:2,g=16,sc=8,sink=2"])
@pytest.mark.parametrize("P", [1, 15, 16, 17, 53])  # 1, G-1, G, G+1, 3G+5
def test_chunk_boundaries_and_sinks(stories, ids, spec, P):
    """After a prefill of P tokens and decode steps, every position holds what the format says:
    sinks and window exact fp16, flushed chunks what the packed storage decodes to, and the
    window is flushed exactly when it reaches max(r, g)."""
    dense = make_cache("fp16", stories.kv_geometry, 1, 200, CPU)
    cache = make_cache(spec, stories.kv_geometry, 1, 200, CPU)
    G, S, thr = cache.G, cache.S, cache.flush_at
    for t in range(P + 3 * G + 2):
        n = P if t == 0 else 1
        if t and t < P:
            continue
        x = np.asarray([ids[t:t + n]]) if t else np.asarray([ids[:P]])
        stories.forward(x, dense)
        stories.forward(x, cache)
        length = int(cache.lengths[0])
        w = length - S - int(cache.n_chunks[0]) * G
        assert 0 <= w < thr or length <= S, (length, w)  # flushed as soon as the window reached thr
        assert int(cache.n_chunks[0]) == ((length - S - thr) // G + 1 if length - S >= thr else 0)
        q = int(cache.n_chunks[0]) * G
        k_rec, v_rec = cache.reconstruct(0)
        for L in range(5):  # the reference attention's dequantized chunks are what storage decodes to
            k_hat, v_hat = cache.dequantize(L)
            np.testing.assert_array_equal(cache.hist_k[L][0, :, :q], k_hat[0, :, :q])
            np.testing.assert_array_equal(cache.hist_v[L][0, :, :q], v_hat[0, :, :q])
        # Layer 0's keys and values do not depend on attention, so they match the fp16 run's.
        for a, b in ((k_rec, dense.k[0]), (v_rec, dense.v[0])):
            np.testing.assert_array_equal(a[0, :, :min(S, length)], fp16(b[0, :, :min(S, length)]))
            np.testing.assert_array_equal(a[0, :, S + q:length], fp16(b[0, :, S + q:length]))
            if q:
                assert not np.array_equal(a[0, :, S:S + q], fp16(b[0, :, S:S + q]))  # really quantized


def _run_batch(model, spec, prompts, steps, next_tokens):
    """Prompts of different lengths in one batch (right-padded), then decode steps."""
    T = max(len(p) for p in prompts)
    batch = np.zeros((len(prompts), T), dtype=np.int64)
    for r, p in enumerate(prompts):
        batch[r, :len(p)] = p
    cache = make_cache(spec, model.kv_geometry, len(prompts), 400, CPU)
    out = [model.forward(batch, cache, n_new=[len(p) for p in prompts])]
    for t in range(steps):
        out.append(model.forward(np.asarray([[nt[t]] for nt in next_tokens]), cache))
    return np.stack(out, 1), cache  # (B, steps + 1, V)


STORAGE = ("kc", "ks", "km", "vc", "vs", "vm", "ka", "va", "kidx", "vidx", "vmask", "kpat", "vpat",
           "win_k", "win_v", "sink_k", "sink_v")


def _feed(spec, geom, rows, schedule):
    """A cache of len(rows) sequences fed keys/values directly: rows[b] = (K, V) of shape
    (L, Hkv, T_b, D); schedule = list of per-row token counts per step."""
    cache = make_cache(spec, geom, len(rows), 800, CPU)
    done = np.zeros(len(rows), dtype=np.int64)
    for n_new in schedule:
        T = max(n_new)
        cache.begin_step(n_new)
        for L in range(geom.n_layers):
            k = np.zeros((len(rows), geom.n_kv_heads, T, geom.head_dim), np.float32)
            v = np.zeros_like(k)
            for b, (K, V) in enumerate(rows):
                k[b, :, :n_new[b]] = K[L][:, done[b]:done[b] + n_new[b]]
                v[b, :, :n_new[b]] = V[L][:, done[b]:done[b] + n_new[b]]
            cache.update(L, k, v)
            cache.commit(L)
        cache.end_step()
        done += n_new
    return cache


@pytest.mark.parametrize("spec", METHODS + ["patternkv:3,sink=4,g=32,r=64"])
def test_batch_rows_never_share_state(stories, ids, spec):
    """Row 0 fed the same keys/values stores the same bytes (patterns, codes, windows)
    whatever sequence shares its batch, and the same as alone."""
    from minikv.kvstats import capture

    a, b, c = (capture(stories, ids[lo:lo + n]) for lo, n in ((0, 400), (100, 300), (380, 300)))
    sched = [[150, 93]] + [[1, 1]] * 120 + [[64, 40]] + [[2, 1]] * 30
    sched_alone = [[n[0]] for n in sched]
    ab = _feed(spec, stories.kv_geometry, [a, b], sched)
    ac = _feed(spec, stories.kv_geometry, [a, c], sched)
    alone = _feed(spec, stories.kv_geometry, [a], sched_alone)
    checked = 0
    for name in STORAGE:
        if hasattr(ab, name):
            for L in range(stories.kv_geometry.n_layers):
                x = getattr(ab, name)[L]
                np.testing.assert_array_equal(x[0], getattr(ac, name)[L][0], err_msg=name)
                np.testing.assert_array_equal(x[0], getattr(alone, name)[L][0], err_msg=name)
                checked += 1
    assert checked >= 5 * 8
    assert not np.array_equal(ab.win_k[2][1], ac.win_k[2][1])  # the other rows really differ
    assert int(ab.n_chunks[1]) == (93 + 120 + 40 + 30 - ab.S - ab.flush_at) // ab.G + 1


def test_fit_applies_to_the_tensors_it_names(stories, ids):
    """fit=v fits V's grids and leaves K's min/max ones (and codes) as plain kivi stores them;
    fit=k the other way round."""
    from minikv.kvstats import capture

    a = capture(stories, ids[:300])
    sched = [[200]] + [[1]] * 100
    plain, fv, fk = (_feed(f"kivi:2,kbits=3,g=32,r=32{opt}", stories.kv_geometry, [a], sched)
                     for opt in ("", ",fit=v", ",fit=k"))
    for L in range(stories.kv_geometry.n_layers):
        for name in ("kc", "ks", "km"):
            np.testing.assert_array_equal(getattr(fv, name)[L], getattr(plain, name)[L])
        for name in ("vc", "vs", "vm"):
            np.testing.assert_array_equal(getattr(fk, name)[L], getattr(plain, name)[L])
    assert not np.array_equal(fv.vs[2], plain.vs[2]) and not np.array_equal(fk.ks[2], plain.ks[2])


@pytest.mark.parametrize("spec", ["kivi:16", "kivi:16,sink=4,r=160"])
def test_batched_model_matches_each_row_alone(stories, ids, spec):
    """Ragged rows (own windows, sinks, flush schedule) through the model. 16-bit codes, so
    batch-shape float noise (~1e-6) is not amplified: at 2 bits one flipped code moves logits
    by percents, which is what test_batch_rows_never_share_state sidesteps by feeding K/V."""
    a, b = ids[:150], ids[200:293]
    follow = [ids[400:520], ids[520:640]]
    both, _ = _run_batch(stories, spec, [a, b], 120, follow)
    for r, (p, f) in enumerate(((a, follow[0]), (b, follow[1]))):
        alone, _ = _run_batch(stories, spec, [p], 120, [f])
        assert rel_err(both[r], alone[0]) < 2e-3


@pytest.mark.parametrize("spec", ["fp16", "kivi:2,g=32,r=32", "nqkv:2,g=32,r=32", "patternkv:2,g=32,r=32",
                                  "patternkv:2,g=32,r=48,sink=4"])
def test_chunked_perplexity_equals_step_by_step(stories, ids, spec):
    chunked = perplexity(stories, ids[:300], spec, prefill=64)
    steps = perplexity(stories, ids[:300], spec, prefill=64, chunked=False)
    assert chunked.tokens == steps.tokens == 299
    # Multi-token and one-token matmuls differ in the last bits, which flips a few 2-bit codes:
    # ~2e-4 here. Chunks that straddle flushes are off by several percent (checked below).
    assert abs(chunked.ppl / steps.ppl - 1) < 2e-3
    assert chunked.bits_per_value == steps.bits_per_value
    if spec != "fp16":
        cache = make_cache(spec, stories.kv_geometry, 1, 300, CPU)
        cache.tokens_until_flush = lambda: 32  # chunks that ignore where the cache flushes
        misaligned = perplexity(stories, ids[:300], spec, prefill=70, cache=cache)
        assert abs(misaligned.ppl / perplexity(stories, ids[:300], spec, prefill=70, chunked=False).ppl - 1) > 1e-2


def test_perplexity_reports_its_progress(stories, ids):
    seen = []
    r = perplexity(stories, ids[:300], "kivi:2,g=32,r=32", prefill=64, progress=lambda n, ppl: seen.append((n, ppl)))
    counts = [n for n, _ in seen]
    assert counts[0] == 64 and counts == sorted(set(counts)) and counts[-1] == r.tokens
    assert seen[-1][1] == pytest.approx(r.ppl, rel=1e-9)


def test_perplexity_windows_begin_behind_bos():
    from minikv.perplexity import windows

    assert windows(300, 128, bos=1) == [(0, 128), (128, 255), (255, 300)]  # 127 text tokens behind each BOS
    assert windows(300, 128, bos=None) == [(0, 128), (128, 256), (256, 300)]
    assert windows(129, 128, bos=None) == [(0, 128)]  # a last window of one token scores nothing


def test_16_bit_uniform_reproduces_the_fp16_cache(stories, ids):
    x = np.asarray([ids[:300]])
    out = {}
    for spec in ("fp16", "kivi:16,g=32,r=32"):
        c = make_cache(spec, stories.kv_geometry, 1, 300, CPU)
        out[spec] = np.concatenate([stories.forward(x[:, :64], c, logits="all")] +
                                   [stories.forward(x[:, t:t + 1], c, logits="all") for t in range(64, 300)], 1)
    assert rel_err(out["kivi:16,g=32,r=32"], out["fp16"]) < 2e-3  # fp16 window/scale rounding only
    two = make_cache("kivi:2,g=32,r=32", stories.kv_geometry, 1, 300, CPU)
    lo = np.concatenate([stories.forward(x[:, :64], two, logits="all")] +
                        [stories.forward(x[:, t:t + 1], two, logits="all") for t in range(64, 300)], 1)
    assert rel_err(lo, out["fp16"]) > 10 * rel_err(out["kivi:16,g=32,r=32"], out["fp16"])  # the test can tell


@pytest.mark.parametrize("rot", ["kv", "k", "v"])
def test_a_turned_cache_gives_the_unturned_attention(stories, ids, rot):
    """rot turns keys, queries and values by an orthogonal matrix before storing and turns the
    output back: at 16 bits the logits are the fp16 cache's, and reconstruct() gives back the
    unturned keys and values; at 2 bits the stored codes differ from the unturned ones."""
    from minikv.kv.chunked import rotation

    r = rotation(8)
    assert np.abs(r @ r.T - np.eye(8)).max() < 1e-6 and np.abs(r).min() == np.abs(r).max()  # a signed Hadamard
    x = np.asarray([ids[:200]])
    caches = {spec: make_cache(spec, stories.kv_geometry, 1, 200, CPU)
              for spec in ("fp16", f"kivi:16,g=32,r=32,rot={rot}", "kivi:2,g=32,r=32", f"kivi:2,g=32,r=32,rot={rot}")}
    out = {spec: stories.forward(x, c, logits="all") for spec, c in caches.items()}
    assert rel_err(out[f"kivi:16,g=32,r=32,rot={rot}"], out["fp16"]) < 2e-3
    k16, v16 = caches[f"kivi:16,g=32,r=32,rot={rot}"].reconstruct(0)
    plain, turned = caches["kivi:2,g=32,r=32"], caches[f"kivi:2,g=32,r=32,rot={rot}"]
    assert (plain.kc[0] != turned.kc[0]).any() == (rot != "v") and (plain.vc[0] != turned.vc[0]).any() == (rot != "k")
    ref = make_cache("fp16", stories.kv_geometry, 1, 200, CPU)
    stories.forward(x, ref)
    assert rel_err(k16, ref.k[0][:, :, :200]) < 2e-3 and rel_err(v16, ref.v[0][:, :, :200]) < 2e-3


def test_patterns_narrow_the_real_k_and_v_of_stories260k(stories, ids):
    stats = layer_stats(stories, ids, ["kivi:2,g=32,r=32", "patternkv:2,g=32,r=32"], "patternkv:2,g=32,r=32", prefill=128)
    for s in stats:
        assert s.k_range_aligned < s.k_range, s
        assert s.v_range_aligned < s.v_range, s
        assert s.k_err["patternkv:2,g=32,r=32"] < s.k_err["kivi:2,g=32,r=32"] * 1.05
    assert np.mean([s.v_resid for s in stats]) > 0.5


def test_v_threshold_in_the_cache_keeps_raw_v_for_structureless_tokens():
    """V built so that the patterns cannot help (independent noise tokens after a clustered
    prefill) is stored raw; clustered V is stored as residuals."""
    from minikv.kv.base import KVGeometry

    geom = KVGeometry(1, 1, 1, 64, 0.125)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 64)) * 4
    clustered = centres[rng.integers(0, 4, 256)] + rng.normal(size=(256, 64)) * 0.2
    noise = rng.normal(size=(128, 64)) * 0.5 + rng.normal(size=(128, 1)) * 6  # far from every pattern
    for v, want in ((clustered, "residual"), (np.concatenate([clustered[:128], noise]), "raw")):
        c = make_cache("patternkv:2,g=64,r=64", geom, 1, 256, CPU)
        k = rng.normal(size=(1, 1, 256, 64)).astype(np.float32)
        c.begin_step([128])
        c.update(0, k[:, :, :128], v[None, None, :128].astype(np.float32))
        c.commit(0)
        c.end_step()
        c.begin_step([128])
        c.update(0, k[:, :, 128:], v[None, None, 128:].astype(np.float32))
        c.commit(0)
        c.end_step()
        mask = np.unpackbits(c.vmask[0][0, 0, 16:32], bitorder="little")  # the second 128 tokens
        assert mask.mean() > 0.9 if want == "residual" else mask.mean() < 0.1


def test_patternkv_mines_an_evenly_spaced_subsample():
    """Past kmpoints prefill tokens, KMeans runs on that many evenly spaced ones (token 0 first),
    the K and V sets of every head independently."""
    from minikv.kv.base import KVGeometry
    from minikv.kv.patterns import kmeans

    geom = KVGeometry(1, 2, 2, 64, 0.125)
    rng = np.random.default_rng(3)
    k, v = (rng.normal(size=(1, 2, 300, 64)).astype(np.float16).astype(np.float32) for _ in range(2))
    pats = {}
    for cap in (50, 0):
        c = make_cache(f"patternkv:2,g=64,r=64,kmpoints={cap}", geom, 1, 320, CPU)
        c.begin_step([300])
        c.update(0, k, v)
        c.commit(0)
        c.end_step()
        pick = np.arange(cap) * 300 // cap if cap else np.arange(300)
        for x, got in ((k, c.kpat[0]), (v, c.vpat[0])):
            np.testing.assert_array_equal(got[0, :, :32], kmeans(np, x[0][:, pick], 32).astype(np.float16))
        pats[cap] = c.kpat[0][0, :, :32]
    assert pick[0] == 0 and not np.array_equal(pats[50], pats[0])


@pytest.mark.parametrize("budget", [1, 1 << 30])  # every layer alone (as before), all at once
def test_patternkv_first_flushes_batched_across_layers_store_the_same(stories, ids, budget, monkeypatch):
    """The prefill's first flushes wait until the step ends (or the byte budget fills) and mine
    every layer's patterns in one KMeans: storage, patterns and the next step's scores are
    exactly what flushing each layer on its own gives."""
    from minikv.kv.patternkv import PatternKVCache

    x = np.asarray([ids[:300], ids[300:600]])
    out = {}
    for b in (0, budget):
        monkeypatch.setattr(PatternKVCache, "FIRST_FLUSH_BATCH_BYTES", b)
        c = make_cache("patternkv:2,g=32,r=32,kmpoints=64", stories.kv_geometry, 2, 400, CPU)
        logits = [stories.forward(x, c, logits="all")]
        logits.append(stories.forward(np.asarray([[ids[600]], [ids[601]]]), c, logits="all"))
        out[b] = c, logits
    (a, la), (b, lb) = out[0], out[budget]
    for name in ("kc", "ks", "km", "vc", "vs", "vm", "kidx", "vidx", "vmask", "kpat", "vpat", "hist_k", "hist_v"):
        for L in range(stories.cfg.num_hidden_layers):
            np.testing.assert_array_equal(getattr(a, name)[L], getattr(b, name)[L], err_msg=f"{name}[{L}]")
    np.testing.assert_array_equal(a.count, b.count)
    assert a.nbytes() == b.nbytes() and int(a.count.min()) >= 32
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(u, v)


def test_bits_per_value_counts_everything(stories, ids):
    g = stories.kv_geometry  # D = 8 here, so per-token V scales are expensive
    c = make_cache("kivi:2,g=32,r=32", g, 1, 300, CPU)
    stories.forward(np.asarray([ids[:256]]), c)  # 8 whole chunks, empty window
    D = g.head_dim
    k_bits = 2 + 2 * 16 / 32  # codes + fp16 scale and min per channel per 32-token chunk
    v_bits = 2 + 2 * 16 / D  # codes + fp16 scale and min per token
    assert c.bits_per_value() == pytest.approx((k_bits + v_bits) / 2)
    stories.forward(np.asarray([ids[256:266]]), c)  # 10 window tokens at 16 bits
    assert c.nbytes() == pytest.approx(256 * 2 * g.n_layers * g.n_kv_heads * D * (k_bits + v_bits) / 2 / 8
                                       + 10 * 2 * g.n_layers * g.n_kv_heads * D * 2)
    c8 = make_cache("kivi:2,g=32,r=32,sc=8", g, 1, 300, CPU)  # one byte per scale and per zero point
    stories.forward(np.asarray([ids[:256]]), c8)
    assert c8.bits_per_value() == pytest.approx((2 + 2 * 8 / 32 + 2 + 2 * 8 / D) / 2)
    p = make_cache("patternkv:2,g=32,r=32", g, 1, 300, CPU)
    stories.forward(np.asarray([ids[:256]]), p)
    extra = p.nbytes() - c.nbytes() + 10 * 2 * g.n_layers * g.n_kv_heads * D * 2  # same chunks, no window
    per_head_layer = 256 * (2 + 1 / 8) + 32 * D * 2 * 2  # indices + mask bits + 32 K and V patterns
    assert extra == pytest.approx(g.n_layers * g.n_kv_heads * per_head_layer)


def test_truncate_only_within_the_window(stories, ids):
    c = make_cache("kivi:2,g=32,r=32", stories.kv_geometry, 1, 300, CPU)
    stories.forward(np.asarray([ids[:70]]), c)  # 2 chunks + 6 window tokens
    assert c.can_truncate(66) and not c.can_truncate(63)
    c.truncate(66)
    assert int(c.lengths[0]) == 66
    with pytest.raises(MinikvError):
        c.truncate(10)


@pytest.mark.parametrize("spec,match", [
    ("kivi:5", "bits=5 is not supported"), ("nqkv:8", "bits=8"), ("patternkv:2,m=0", "m <= mmax"),
    ("patternkv:2,mmax=300", "256"), ("patternkv:2,kmpoints=-1", "kmpoints=-1"), ("patternkv:2,kmpoints=16", ">= m=32"), ("nqkv:2,kaxis=diag", "kaxis=diag"), ("kivi:2,foo=1", "unknown option 'foo'"),
    ("kivi:2,g=12", "multiple of 8"), ("nqkv:2,bs=12", "multiple of 8"), ("kivi:2,kbits=x", "not an integer"),
    ("nqkv:2,kaxis=channel,bs=48", "must divide g"), ("kivi:2,sc=4", "sc=4 must be"),
    ("kivi:8,sc=8", "at most 4 bits"), ("patternkv:2,sc=8", "kivi.s alone"), ("patternkv:2,fit=mse", "kivi.s alone")])
def test_invalid_specs_list_what_is_valid(spec, match):
    with pytest.raises(MinikvError, match=match) as e:
        parse_kv_spec(spec)
    assert "valid:" in str(e.value) and "g=" in str(e.value)


def test_mixed_bits(stories, ids):
    c = make_cache("kivi:2,vbits=4,g=32,r=32", stories.kv_geometry, 1, 300, CPU)
    assert c.kc[0].shape[-1] == 8 * 2 // 8 and c.vc[0].shape[-1] == 8 * 4 // 8
    stories.forward(np.asarray([ids[:64]]), c)
    assert 3.0 < c.bits_per_value() < 4.0 + 4


def test_quantized_session_chat_turns(stories):
    """A generation session on a quantized cache: a second turn reuses or rebuilds the cache
    and gives the same reply as a fresh session."""
    from minikv.generate import Result, Session
    from minikv.sampler import SamplingParams
    from minikv.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(STORIES)
    p = SamplingParams(temperature=0)
    s = Session(stories, tok, kv="patternkv:2,g=16")
    first = tok.encode("Once upon a time")
    r1 = Result()
    list(s.generate(first, p, 40, result=r1))
    second = first + r1.token_ids + tok.encode(" Then", add_special_tokens=False)
    r2, fresh = Result(), Result()
    list(s.generate(second, p, 10, result=r2))
    list(Session(stories, tok, kv="patternkv:2,g=16").generate(second, p, 10, result=fresh))
    assert r2.token_ids == fresh.token_ids


@pytest.mark.parametrize("D", [8, 64, 128])
def test_hadamard_op_is_the_rotation_matrix(D):
    """ArrayOps.hadamard (the butterflies the kernel runs) equals x @ R, and back undoes it."""
    from minikv.kv.chunked import rotation, rotation_signs
    from minikv.ops import ArrayOps

    x = np.random.default_rng(D).standard_normal((2, 3, 5, D)).astype(np.float32)
    ops, signs = ArrayOps(np), rotation_signs(D)
    turned = ops.hadamard(x, signs)
    np.testing.assert_allclose(turned, x @ rotation(D), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ops.hadamard(turned, signs, back=True), x, rtol=0, atol=1e-5)
