"""A cache's row view (`KVCache.row_range`): a forward over some rows of a batch cache stores and
reads exactly what the same forward over a cache of those rows alone does, and the parent cache
then holds them (the server prefills one slot's prompt without running the idle slots' rows)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import STORIES, TEXT
from helpers import rel_err
from minikv.backend import get_backend
from minikv.kv import make_cache
from minikv.models import load_model
from minikv.tokenizer import Tokenizer

CPU = get_backend("cpu")
SPECS = ["fp16", "kivi:2,g=32,r=32", "patternkv:2,g=32,r=48,sink=4", "nqkv:2,g=32,r=32"]


@pytest.fixture(scope="module")
def model():
    return load_model(STORIES, CPU)


@pytest.fixture(scope="module")
def ids():
    return Tokenizer.from_dir(STORIES).encode((TEXT / "tinystories_valid_fragment.txt").read_text())[:300]


def storage_rows(cache, rows):
    """Every stored array's given rows, and the per-row host state, by name."""
    out = {}
    for name, value in vars(cache).items():
        if any(value is arrays for arrays in cache._storage):
            for layer, a in enumerate(value):
                out[f"{name}[{layer}]"] = np.asarray(a[rows])
    for name, axis in cache.ROW_STATE:
        out[name] = getattr(cache, name)[(slice(None),) * axis + (rows,)]
    return out


def feed(model, cache, pieces):
    """pieces: [(row slice, ids (b, T))] fed in turn; the logits after each."""
    out = []
    for (b0, b1), x in pieces:
        with cache.row_range(b0, b1) as view:
            out.append(model.forward(np.asarray(x), view))
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_a_view_stores_what_a_cache_of_its_rows_alone_stores(model, ids, spec):
    geom = model.kv_geometry
    parent = make_cache(spec, geom, 4, 256, CPU)
    # row 2 in pieces across quantization chunks, then rows 0..1 together, then row 3 and a decode step of row 2
    a, b = np.asarray(ids[:70]), np.asarray([ids[100:140], ids[200:240]])
    plan = [((2, 3), a[None, :25]), ((2, 3), a[None, 25:70]), ((0, 2), b), ((3, 4), a[None, :9]),
            ((2, 3), np.asarray([[ids[70]]]))]
    got = feed(model, parent, plan)
    alone = {2: make_cache(spec, geom, 1, 256, CPU), 0: make_cache(spec, geom, 2, 256, CPU),
             3: make_cache(spec, geom, 1, 256, CPU)}
    want = [model.forward(np.asarray(x), alone[b0]) for (b0, _), x in plan]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert parent.lengths.tolist() == [40, 40, 71, 9]
    for (b0, b1), single in ((2, 3), alone[2]), ((0, 2), alone[0]), ((3, 4), alone[3]):
        mine, theirs = storage_rows(parent, slice(b0, b1)), storage_rows(single, slice(None))
        assert mine.keys() == theirs.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)


@pytest.mark.parametrize("spec", SPECS)
def test_the_parent_decodes_on_from_what_views_stored(model, ids, spec):
    """After rows are prefilled through views, a step over the whole batch continues each row as a
    cache of that row alone would (a batch matmul may round differently: close, not equal)."""
    geom = model.kv_geometry
    parent = make_cache(spec, geom, 2, 256, CPU)
    singles = [make_cache(spec, geom, 1, 256, CPU) for _ in range(2)]
    prompts = [ids[:50], ids[60:131]]
    for b, p in enumerate(prompts):
        with parent.row_range(b, b + 1) as view:
            model.forward(np.asarray([p]), view)
        model.forward(np.asarray([p]), singles[b])
    step = np.asarray([[ids[50]], [ids[131]]])
    got = model.forward(step, parent)
    for b in range(2):
        assert rel_err(got[b], model.forward(step[b:b + 1], singles[b])[0]) < 1e-4
    assert parent.lengths.tolist() == [51, 72]


def test_a_failed_step_leaves_the_parent_unchanged(model, ids):
    parent = make_cache("kivi:2,g=32,r=32", model.kv_geometry, 2, 64, CPU)
    with pytest.raises(Exception, match="context full"):
        with parent.row_range(1, 2) as view:
            model.forward(np.asarray([ids[:100]]), view)
    assert parent.lengths.tolist() == [0, 0] and parent.n_chunks.tolist() == [0, 0]
    with pytest.raises(ValueError):
        with parent.row_range(1, 3):
            pass
