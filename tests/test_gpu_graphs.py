"""CUDA-graph decode: replayed steps give the eager steps' logits bit for bit, for every method,
through flushes (eager steps between replays), split changes (new captures) and ragged batches."""
from __future__ import annotations

import numpy as np
import pytest

from minikv.backend import get_backend
from minikv.config import ModelConfig, RopeConfig
from minikv.kv import make_cache
from minikv.stepper import Stepper
from minikv.synthetic import synthetic_model

pytestmark = pytest.mark.gpu

SPECS = ["fp16", "kivi:2,g=64,r=64", "kivi:4", "kivi:3,g=64", "kivi:2,sink=4,g=64", "kivi:8,g=64",
         "nqkv:2,g=64", "nqkv:4,kaxis=channel,bs=8,g=64", "patternkv:2,g=64,r=64", "patternkv:4,g=64,sink=4",
         "kivi:2,kbits=3,g=64,rot=kv"]


def tiny(qwen3: bool = False, D: int = 64) -> ModelConfig:
    """3 layers, GQA 4:2, a small vocabulary: fast, and greedy choices that move."""
    return ModelConfig(model_type="qwen3" if qwen3 else "llama", vocab_size=512, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=D, rms_norm_eps=1e-5, max_position_embeddings=4096, rope=RopeConfig(theta=10000.0),
                       attention_bias=not qwen3, qk_norm=qwen3)


def idle(step: int) -> list[int]:
    """Which rows take a token at a step: row 1 sits out every third, row 2 steps 50-119 (a
    server's idle slots), row 0 always."""
    return [1, int(step % 3 != 0), int(not 50 <= step < 120)]


def decode(model, spec, graphs: bool, lengths=(1000, 950, 990), steps=300, n_new=lambda step: 1):
    """Greedy decode of a ragged batch: (logits per step (steps, B, V), the stepper); n_new(step):
    the rows taking a token (an idle row's logits are zeroed here: they mean nothing)."""
    be = model.backend
    B, T = len(lengths), max(lengths)
    cache = make_cache(spec, model.kv_geometry, B, T + steps + 1, be)
    st = Stepper(model, cache, ubatch=64, graphs=graphs)
    prompt = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (B, T))
    logits = model.forward(prompt, cache, n_new=list(lengths))
    out = []
    active = np.ones(B, bool)
    for i in range(steps):
        host = np.where(active[:, None], be.to_host(logits), 0)
        out.append(host)
        active = np.broadcast_to(np.asarray(n_new(i)), (B,)).astype(bool)
        logits = st.decode(host.argmax(axis=-1), active.astype(np.int64))
    return np.stack(out), st


@pytest.fixture(scope="module")
def model():
    return synthetic_model(tiny(), get_backend("cuda"))


@pytest.mark.parametrize("spec", SPECS)
def test_graph_steps_equal_eager_steps(model, spec):
    eager, _ = decode(model, spec, graphs=False)
    graph, st = decode(model, spec, graphs=True)
    print(f"{spec}: {st.graphs.captures} graphs captured, {st.graphs.replays} of 300 steps replayed")
    assert st.graphs.replays >= 200  # most steps replayed (flushes and their neighbours run eagerly)
    assert st.graphs.captures >= 2  # the keys passed 1024 (a larger split): a new capture
    np.testing.assert_array_equal(graph, eager)


@pytest.mark.parametrize("spec", ["fp16", "kivi:2,g=64,r=64", "nqkv:2,g=64", "patternkv:2,g=64,r=64"])
def test_graph_steps_with_idle_rows(model, spec):
    """Steps where some rows take no token (a server's idle slots) are replayed too, and equal
    the eager steps on the rows that do."""
    eager, _ = decode(model, spec, graphs=False, n_new=idle)
    graph, st = decode(model, spec, graphs=True, n_new=idle)
    assert st.graphs.replays >= 200
    np.testing.assert_array_equal(graph, eager)


@pytest.mark.parametrize("spec", ["fp16", "kivi:2,g=64,r=64"])
def test_graph_steps_of_a_server_batch(model, spec):
    """16 rows: the step's matmuls go to cuBLAS (cuda/gemm.py) and the step is still replayed,
    its logits those of the eager steps."""
    assert model.backend.ops.graph_rows == 64, "cuBLAS could not be captured on this device (cuda/gemm.probe)"
    lengths = tuple(900 + 7 * i for i in range(16))
    eager, _ = decode(model, spec, graphs=False, lengths=lengths, steps=150)
    graph, st = decode(model, spec, graphs=True, lengths=lengths, steps=150)
    assert st.graphs.replays >= 100
    np.testing.assert_array_equal(graph, eager)


def test_graph_steps_qwen3_norms_and_head_dim_128():
    """Qwen3's q/k norms (array ops in the captured step) and head_dim 128 kernels."""
    model = synthetic_model(tiny(qwen3=True, D=128), get_backend("cuda"))
    for spec in ("fp16", "kivi:2,g=64,r=64"):
        eager, _ = decode(model, spec, graphs=False, steps=150)
        graph, st = decode(model, spec, graphs=True, steps=150)
        assert st.graphs.replays >= 100
        np.testing.assert_array_equal(graph, eager)


def test_kv_append_matches_array_ops():
    """The device-offset cache write equals the host slicing it replaces, ragged rows included."""
    import cupy as cp

    from minikv.ops import ArrayOps

    be = get_backend("cuda")
    rng = np.random.default_rng(0)
    B, H, Hkv, T, D, cap = 3, 4, 2, 5, 64, 40
    qkv = cp.asarray(rng.normal(size=(B, T, (H + 2 * Hkv) * D)).astype(np.float16))
    k = qkv[..., H * D:(H + Hkv) * D].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
    v = qkv[..., (H + Hkv) * D:].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
    info = np.zeros((B, 6), np.int32)
    info[:, 2], info[:, 3] = [0, 17, 30], [5, 2, 0]  # offsets and valid tokens per row
    outs = []
    for ops in (be.ops, ArrayOps(cp)):
        dk, dv = cp.zeros((B, Hkv, cap, D), np.float16), cp.zeros((B, Hkv, cap, D), np.float16)
        ops.kv_append(k, v, dk, dv, info, cp.asarray(info))
        outs.append((dk.get(), dv.get()))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert outs[0][0][1, :, 17:19].any() and not outs[0][0][1, :, 19:].any() and not outs[0][0][2].any()


@pytest.mark.parametrize("spec", ["fp16", "kivi:2,g=64,r=64", "patternkv:2,g=64,r=64,sink=4", "kivi:2,g=64,rot=kv"])
def test_row_view_prefill_equals_a_cache_of_that_row(model, spec):
    """A server slot's prompt through a row view of a 4-row cache (fused kernels on sliced storage)
    gives the logits of a 1-row cache fed the same, then decodes on in the whole batch."""
    be = model.backend
    rng = np.random.default_rng(2)
    parent = make_cache(spec, model.kv_geometry, 4, 1024, be)
    alone = make_cache(spec, model.kv_geometry, 1, 1024, be)
    for piece in (rng.integers(0, 512, (1, 300)), rng.integers(0, 512, (1, 200))):
        with parent.row_range(2, 3) as view:
            got = be.to_host(model.forward(piece, view))
        np.testing.assert_array_equal(got, be.to_host(model.forward(piece, alone)))
    assert parent.lengths.tolist() == [0, 0, 500, 0]
    st = Stepper(model, parent, ubatch=64)
    for _ in range(3):
        out = be.to_host(st.decode(np.array([0, 0, 7, 0]), np.array([0, 0, 1, 0])))
        assert np.isfinite(out[2]).all()
    assert parent.lengths.tolist() == [0, 0, 503, 0]


class LetterTokenizer:
    """What a session needs of a tokenizer, for a synthetic model: an id is a letter."""
    eos_ids = frozenset()

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("spec", ["fp16", "kivi:2,g=64,r=64", "kivi:2,g=64,rot=kv,sink=4"])
def test_pipelined_generate_with_graphs_equals_eager(model, spec):
    """A session's pipelined loop (the drawn id fed from the device, graphs replayed) gives the
    token ids of the eager loop and keeps the session's token list equal to what the cache holds."""
    from minikv.generate import Result, Session
    from minikv.sampler import SamplingParams

    prompt = np.random.default_rng(4).integers(0, 512, 700).tolist()
    out = {}
    for graphs in (False, True):
        s, res = Session(model, LetterTokenizer(), kv=spec, ctx_size=1024, graphs=graphs), Result()
        list(s.generate(prompt, SamplingParams(temperature=0), 200, result=res))
        assert int(s.cache.lengths[0]) == len(s.tokens) == len(prompt) + 199
        out[graphs] = res.token_ids
        if graphs:
            assert s.stepper.graphs.replays >= 150
    assert out[True] == out[False]
