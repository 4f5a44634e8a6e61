"""Fuzzing the two weight-file parsers: a few thousand mutations of real small files (the
stories260K safetensors, a tiny quantized GGUF). Each case must load or fail with a MinikvError,
never another exception, within CASE_SECONDS and without allocating more than the file's size
plus EXTRA_BYTES (Python and NumPy allocations, measured with tracemalloc)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tracemalloc

import numpy as np
import pytest

from conftest import STORIES
from gguf_helpers import llama3_rope_factors, tiny_gpt2_vocab
from minikv.backend import get_backend
from minikv.convert import convert
from minikv.errors import MinikvError
from minikv.models import load_model
from minikv.safetensors_io import SafetensorsFile
from minikv.tokenizer import Tokenizer

SEED = 20240607
ST_CASES, GGUF_CASES = 1500, 1000
CASE_SECONDS = 2.0  # a case takes ~10 ms; only a runaway loop comes near this
EXTRA_BYTES = 64 << 20
HUGE = [0, 1, 2, 3, 7, 8, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1]
CPU = get_backend("cpu")

pytestmark = [pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM timers"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")]


class CaseTimeout(BaseException):  # not an Exception: no handler in the code under test can swallow it
    pass


def _alarm(signum, frame):
    raise CaseTimeout


def run_cases(cases, body, file_size: int) -> dict[str, int]:
    """Run body(case) for each (label, case); fail naming the case if it raises anything but
    MinikvError, runs past CASE_SECONDS or allocates too much. Returns outcome counts."""
    counts = {"ok": 0, "error": 0}
    limit = file_size + EXTRA_BYTES
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    try:
        for label, case in cases:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                body(case)
                counts["ok"] += 1
            except MinikvError:
                counts["error"] += 1
            except CaseTimeout:
                pytest.fail(f"case {label}: still running after {CASE_SECONDS} s")
            except Exception as e:  # noqa: BLE001 - the point of the test: name the case, keep the traceback
                raise AssertionError(f"case {label}: {type(e).__name__} escaped: {e}") from e
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            peak = tracemalloc.get_traced_memory()[1] - base
            assert peak <= limit, f"case {label}: allocated {peak} bytes for a {file_size}-byte file"
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)
    return counts


def replace_file(path, data: bytes) -> None:
    """Write a new inode, so memory maps still open on the old contents stay valid."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- safetensors --------------------------------------------------------------------------------
GARBAGE = [None, True, -1, -(2**63), 1.5, 1e300, "12", "", [], [[]], {}, {"a": [1, {"b": None}]},
           [1, 2, 3], 2**64, 2**63, 2**40, 0]


def _lie(rng, v):
    """A plausible lie about an integer: off by a little, huge, negative, or not an int at all."""
    k = rng.integers(4)
    if k == 0:
        return v + int(rng.integers(-9, 10))
    if k == 1:
        return HUGE[rng.integers(len(HUGE))]
    if k == 2:
        return -int(rng.integers(1, 2**40))
    return GARBAGE[rng.integers(len(GARBAGE))]


def _mutate_entry(rng, e: dict, header: dict) -> None:
    k = rng.integers(10)
    if k == 0:
        e["data_offsets"] = [_lie(rng, o) if rng.integers(2) else o for o in e["data_offsets"]]
    elif k == 1:
        lo, hi = e["data_offsets"]
        e["data_offsets"] = [hi, lo] if rng.integers(2) else [lo, hi, hi]
    elif k == 2:
        e["shape"] = [_lie(rng, d) if rng.integers(2) else d for d in e["shape"]]
    elif k == 3:  # dims whose product wraps around 2**64 or is 0, with the byte count kept
        e["shape"] = [[2**32, 2**32], [2**63, 0], [0, 2**64 - 1], [2**40] * 3, [1] * 100,
                      [2**33, 2**31, 0]][rng.integers(6)]
    elif k == 4:
        e["dtype"] = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "U16", "F8_E4M3", "f32", "",
                      None, 3, ["F32"]][rng.integers(14)]
    elif k == 5:
        del e[["dtype", "shape", "data_offsets"][rng.integers(3)]]
    elif k == 6:
        e[["dtype", "shape", "data_offsets"][rng.integers(3)]] = GARBAGE[rng.integers(len(GARBAGE))]
    elif k == 7:  # a second tensor over (part of) the same bytes
        header[f"x{rng.integers(99)}"] = dict(e)
    elif k == 8:  # an extra empty tensor where a tensor starts: legal, but for its shape
        shape = [[0], [3, 0], [2**63, 0], [0, 2**40, 2**40], [1] * 40 + [0], [0] * 70][rng.integers(6)]
        lo = e["data_offsets"][0]
        header[f"z{rng.integers(99)}"] = {"dtype": "F32", "shape": shape, "data_offsets": [lo, lo]}
    else:
        header["__metadata__"] = [None, {"k": 1}, {"k": None}, ["a"], "x", {"k": {"a": "b"}},
                                  {"format": "pt"}][rng.integers(7)]


def _rewrite_header(rng, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    k = rng.integers(10)
    if k < 3:  # still valid: entries reordered, metadata added, padded as writers pad
        names = list(header)
        header = {name: header[name] for name in rng.permutation(names)}
        header["__metadata__"] = {"format": "pt"}
        return _with_length(json.dumps(header).encode() + b" " * int(rng.integers(8)), body)
    if k == 3:  # not an object, or nested too deep for any parser's recursion
        blob = [b"[" * 100_000 + b"]" * 100_000, b"9" * 5000, b'"x"', b"[1,2]", b"null",
                b'{"a": ' * 5000 + b"1" + b"}" * 5000][rng.integers(6)]
    else:
        names = [name for name in header if name != "__metadata__"]
        for name in rng.choice(names, size=int(rng.integers(1, 3)), replace=False):  # each entry once
            _mutate_entry(rng, header[name], header)
        blob = json.dumps(header).encode()
    return _with_length(blob, body, 0 if rng.integers(3) else int(rng.integers(-8, 9)))


def _with_length(blob: bytes, body: bytes, lie: int = 0) -> bytes:
    return struct.pack("<Q", (len(blob) + lie) % 2**64) + blob + body


def mutate_safetensors(rng, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    k = rng.integers(5)
    if k == 0:  # truncated: often inside the header, mostly in the data
        return data[:int(rng.integers(n + 16)) if rng.integers(3) == 0 else int(rng.integers(len(data)))]
    if k == 1:  # a lying header length
        lie = HUGE[rng.integers(len(HUGE))] if rng.integers(2) else n + int(rng.integers(-64, 65))
        return struct.pack("<Q", lie % 2**64) + data[8:]
    if k == 2:  # random bytes in the length and the header
        d = bytearray(data)
        for _ in range(rng.integers(1, 6)):
            d[rng.integers(8 + n)] = rng.integers(256)
        return bytes(d)
    return _rewrite_header(rng, data)


def test_fuzz_safetensors(tmp_path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    model = tmp_path / "m"
    shutil.copytree(STORIES, model, copy_function=shutil.copyfile)  # writable, unlike the shared copy
    model.chmod(0o755)
    path = model / "model.safetensors"
    data = path.read_bytes()
    rng = np.random.default_rng(SEED)

    def case(mutated: bytes):
        replace_file(path, mutated)
        try:
            load_file(path)
            ref_ok = True
        except (SafetensorError, ValueError):  # ValueError: NumPy refusing a shape it accepted
            ref_ok = False
        # As strict as the reference library and no stricter, but for what minikv cannot read.
        try:
            st = SafetensorsFile(path)
        except MinikvError as e:
            assert not ref_ok or "minikv cannot read" in str(e), f"the safetensors library reads it: {e}"
            raise
        assert ref_ok, "SafetensorsFile accepted a file the safetensors library rejects"
        for name in st.keys():
            st.raw(name)
            st.float32(name)
        if rng.integers(8) == 0:
            load_model(model, CPU)

    cases = [(i, mutate_safetensors(rng, data)) for i in range(ST_CASES)]
    counts = run_cases(cases, case, len(data))
    assert counts["ok"] > ST_CASES // 20 and counts["error"] > ST_CASES // 2, counts  # both exercised


# -- GGUF ---------------------------------------------------------------------------------------
def tiny_gguf(path, seed: int = 0):
    """A 2-layer llama GGUF (~33 KB): Q8_0 and Q4_1 matrices, f32 norms, a byte-level BPE
    vocabulary with merges, and a rope_freqs tensor, so every reading path of convert runs."""
    import gguf

    rng = np.random.default_rng(seed)
    C, I, H, KV, D, V, L = 32, 64, 2, 1, 16, 300, 2
    theta = 500000.0
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_feed_forward_length(I)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    tokens, types, merges = tiny_gpt2_vocab(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")

    def mat(name, rows, cols, qtype):
        q = gguf.quants.quantize(rng.normal(size=(rows, cols)).astype(np.float32), qtype)
        w.add_tensor(name, q, raw_dtype=qtype)

    Q = gguf.GGMLQuantizationType
    mat("token_embd.weight", V, C, Q.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(C, np.float32))
    w.add_tensor("rope_freqs.weight", llama3_rope_factors(theta, D, 8.0, 1.0, 4.0, 8192))
    for i in range(L):
        q = (Q.Q8_0, Q.Q4_1)[i % 2]
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(C, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(C, np.float32))
        for name, rows, cols in [("attn_q", H * D, C), ("attn_k", KV * D, C), ("attn_v", KV * D, C),
                                 ("attn_output", C, H * D), ("ffn_gate", I, C), ("ffn_up", I, C),
                                 ("ffn_down", C, I)]:
            mat(f"blk.{i}.{name}.weight", rows, cols, q)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return path


def gguf_slots(path) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """(byte offset, width) of the GGUF's integer fields by role (the ones a corrupt file lies in),
    and where the tensor data starts."""
    import gguf

    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data
    at = lambda p, i=0: (p.ctypes.data - base + i * p.itemsize, p.itemsize)  # noqa: E731
    slots = {"version": [(4, 4)], "tensor_count": [(8, 8)], "kv_count": [(16, 8)], "key_len": [],
             "value_type": [], "str_len": [], "array_type": [], "array_count": [], "name_len": [],
             "n_dims": [], "dims": [], "tensor_type": [], "tensor_offset": []}
    for f in list(r.fields.values())[3:]:  # the first three are the header above
        slots["key_len"].append(at(f.parts[0]))
        slots["value_type"].append(at(f.parts[2]))
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            slots["array_type"].append(at(f.parts[3]))
            slots["array_count"].append(at(f.parts[4]))
        if f.types[-1] == gguf.GGUFValueType.STRING:  # a length is the part before its bytes, f.data[i]
            slots["str_len"] += [at(f.parts[i - 1]) for i in f.data[:3]]
    for t in r.tensors:
        p = t.field.parts
        slots["name_len"].append(at(p[0]))
        slots["n_dims"].append(at(p[2]))
        slots["dims"] += [at(p[3], i) for i in range(p[3].size)]
        slots["tensor_type"].append(at(p[4]))
        slots["tensor_offset"].append(at(p[5]))
    return slots, r.data_offset


def _put(d: bytearray, slot, value: int) -> None:
    off, width = slot
    d[off:off + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")


def mutate_gguf(rng, data: bytes, slots: dict, header_end: int) -> bytes:
    d = bytearray(data)
    k = rng.integers(10)
    if k == 0:
        return data[:int(rng.integers(len(data)))]
    if k in (1, 2):  # random bytes in the metadata and tensor infos
        for _ in range(rng.integers(1, 8)):
            d[rng.integers(header_end)] = rng.integers(256)
    elif k == 3:  # flipped bits anywhere, tensor data included
        for _ in range(rng.integers(1, 4)):
            d[rng.integers(len(d))] ^= 1 << int(rng.integers(8))
    elif k == 4:  # a huge count of small items (a loop per item, an allocation per item)
        i = rng.integers(len(slots["array_count"]))
        _put(d, slots["array_type"][i], int(rng.integers(10)))  # UINT8 .. FLOAT32, BOOL, STRING, ARRAY
        _put(d, slots["array_count"][i], HUGE[rng.integers(8, len(HUGE))])
    else:  # lies in one to three length / count / type / offset fields
        roles = list(slots)
        for _ in range(rng.integers(1, 4)):
            role = roles[rng.integers(len(roles))]
            slot = slots[role][rng.integers(len(slots[role]))]
            old = int.from_bytes(d[slot[0]:slot[0] + slot[1]], "little")
            how = rng.integers(4)
            value = (HUGE[rng.integers(len(HUGE))] if how == 0 else old + int(rng.integers(-3, 4)) if how == 1
                     else int(rng.integers(0, 40)) if how == 2 else int(rng.integers(0, 2**32)))
            _put(d, slot, value)
    return bytes(d)


def test_fuzz_gguf(tmp_path):
    src = tiny_gguf(tmp_path / "good.gguf")
    data = src.read_bytes()
    slots, header_end = gguf_slots(src)
    path, out = tmp_path / "case.gguf", tmp_path / "out"
    rng = np.random.default_rng(SEED)

    def case(mutated: bytes):
        replace_file(path, mutated)
        try:
            convert(path, out, dtype="f32")
        except MinikvError:
            assert not out.exists() and not list(tmp_path.glob(".out.*")), "a failed convert left files"
            raise
        try:  # what converts must be usable
            load_model(out, CPU)
            Tokenizer.from_dir(out).encode("Once upon a time")
        except MinikvError as e:
            raise AssertionError(f"converted into an unusable directory: {e}") from e
        finally:
            shutil.rmtree(out)

    case(data)  # the unmutated file converts (and warms up imports outside the time limit)
    cases = [(i, mutate_gguf(rng, data, slots, header_end)) for i in range(GGUF_CASES)]
    counts = run_cases(cases, case, len(data))
    assert counts["ok"] > GGUF_CASES // 20 and counts["error"] > GGUF_CASES // 2, counts
