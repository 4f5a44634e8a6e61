"""minikv.convert.gguf_tokenizer: the tokenizer rebuilt from GGUF metadata must encode like
transformers' own GGUF loader (and, where the two differ, like llama.cpp; see DEVIATIONS)."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from minikv.convert.gguf_reader import GGUFFile
from minikv.convert.gguf_tokenizer import (DEVIATIONS, build_tokenizer_files, read_gguf_fields,
                                           write_tokenizer_files)
from minikv.errors import MinikvError

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, TokenizersBackend  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "text"
CHAT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
# Unicode, digits, code, runs of spaces / newlines / tabs, special tokens in running text. A run
# of 2+ spaces right before a digit is left out here: see test_smollm_digits_follow_llama_cpp.
MIXED = (CHAT + "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 😀👍🏽, Ω≈ç√∫.\n"
         "Numbers: 3.14159, 1,234,567 and 2024-06-01; x=42 y = 7\n\n\n"
         "def f(a,   b):\n\tif a  and b:\n\t\treturn a**2 + b  # ok\n    pass\r\n"
         "It's what we'd've done, I'LL say.<|endoftext|>  trailing   \n \n")


def _samples() -> dict[str, str]:
    out = {"mixed": MIXED, "chat": CHAT, "empty": "", "spaces": "   \n\n  \t "}
    for name in ("austen_prideprejudice.txt", "austen_emma.txt", "shakespeare_hamlet.md",
                 "shakespeare_macbeth.md", "tinystories_valid_fragment.txt"):
        text = (TEXT / name).read_text(encoding="utf-8")
        out[name] = text[20000:24000] if len(text) > 30000 else text[:4000]
    return out


def _write(fields: dict) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(build_tokenizer_files(fields)["tokenizer.json"]))


def _write_gguf(path: Path, fields: dict) -> None:
    """A metadata-only GGUF holding fields (ids as uint32, as llama.cpp writes them)."""
    w = gguf.GGUFWriter(str(path), fields.get("general.architecture", "llama"))
    for key, val in fields.items():
        if key == "general.architecture":
            continue
        if isinstance(val, list):
            w.add_array(key, val)
        elif isinstance(val, bool):
            w.add_bool(key, val)
        elif isinstance(val, int):
            w.add_uint32(key, val)
        else:
            w.add_string(key, val)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _hf_from_fields(tmp_path: Path, fields: dict):
    """transformers' GGUF tokenizer path (what AutoTokenizer(gguf_file=) builds) for fields."""
    _write_gguf(tmp_path / "ref.gguf", fields)
    return TokenizersBackend.from_pretrained(str(tmp_path), gguf_file="ref.gguf")


# ---------------------------------------------------------------- SmolLM2 (gpt2 vocab, pre=smollm)

@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    fields = read_gguf_fields(GGUFFile(smollm2_gguf))
    out = tmp_path_factory.mktemp("smol_tok")
    write_tokenizer_files(fields, out)
    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return fields, out, Tokenizer.from_file(str(out / "tokenizer.json")), hf


def test_read_gguf_fields_plain_python(smol):
    fields = smol[0]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert len(fields["tokenizer.ggml.tokens"]) == 49152 and fields["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert fields["tokenizer.ggml.merges"][0] == "Ġ t"
    assert isinstance(fields["tokenizer.ggml.token_type"][0], int)
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.bos_token_id"] == 1


def test_read_gguf_fields_types_and_bad_utf8(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", b"\xff\xfe"])  # a non-UTF-8 token: kept, as U+FFFD
    w.add_array("x.scores", [1.5, -2.0])
    w.add_bool("x.flag", True)
    w.add_uint32("x.id", 7)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    fields = read_gguf_fields(GGUFFile(tmp_path / "t.gguf"))
    assert fields["tokenizer.ggml.tokens"] == ["a", "\ufffd\ufffd"] and fields["general.architecture"] == "llama"
    assert (fields["x.scores"], fields["x.flag"], fields["x.id"]) == ([1.5, -2.0], True, 7)


@pytest.mark.parametrize("add_special", [True, False])
def test_smollm2_matches_transformers(smol, add_special):
    _, _, ours, hf = smol
    for name, text in _samples().items():
        ids = ours.encode(text, add_special_tokens=add_special).ids
        assert ids == hf(text, add_special_tokens=add_special)["input_ids"], name


def test_smollm2_no_bos(smol):
    # The file says add_bos_token=false; transformers honours it (and so does llama.cpp): no BOS.
    fields, out, ours, hf = smol
    assert hf("hello")["input_ids"] == ours.encode("hello").ids == [28120]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert ours.encode(CHAT).ids[:3] == [1, 4093, 198]  # <|im_start|> matched whole, special


def test_smollm2_decode_round_trips(smol):
    _, _, ours, hf = smol
    for name, text in _samples().items():
        ids = ours.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == text, name
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), name
    assert ours.decode(ours.encode(CHAT).ids) == "user\nhi\nassistant\n"  # specials skipped


def test_smollm2_written_dir_loads_with_autotokenizer(smol):
    fields, out, _, hf = smol
    files = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    tok = AutoTokenizer.from_pretrained(str(out))
    for name, text in _samples().items():
        assert tok(text)["input_ids"] == hf(text)["input_ids"], name
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == \
        ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert tok.decode(tok("x <|im_end|>")["input_ids"], skip_special_tokens=True) == "x "


def test_smollm2_chat_template(smol):
    fields, out, _, hf = smol
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == fields["tokenizer.chat_template"] and "<|im_start|>" in cfg["chat_template"]
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    tok = AutoTokenizer.from_pretrained(str(out))
    ours = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n") and "<|im_start|>system\n" in ours


def test_smollm_digits_follow_llama_cpp(smol):
    """The one place we differ from transformers on purpose: llama.cpp (and SmolLM2's own
    tokenizer.json) split digits off before the GPT-2 regex, so 2+ spaces before a digit stay one
    pre-token; transformers' GGUF loader leaves them as GPT-2 does."""
    _, _, ours, hf = smol
    text = "x  1  22\n   3"
    assert ours.encode(text).tokens == ["x", "ĠĠ", "1", "ĠĠ", "2", "2", "ĊĠĠĠ", "3"]
    assert hf.convert_ids_to_tokens(hf(text)["input_ids"])[:4] == ["x", "Ġ", "Ġ", "1"]
    assert "smollm" in DEVIATIONS
    # With transformers' tokenizer given llama.cpp's split, the two agree everywhere.
    ref = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for t in [text, MIXED.replace("x=42", "x  =  42  7"), *_samples().values()]:
        assert ours.encode(t).ids == ref.encode(t).ids


# ------------------------------------------------- synthetic byte-level vocabularies (llama3, qwen2)

def _byte_level_fields(pre: str) -> dict:
    from minikv.convert.gguf_tokenizer import _bytes_to_unicode

    alphabet = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "4 5", "Ġ 1", "a b"]
    extra = ["Ġt", "he", "Ġthe", "12", "123", "45", "Ġ1", "ab", "abc"]  # "abc": in vocab, no merge
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", *alphabet, *extra, "<think>"]
    types = [3, 3] + [1] * (len(alphabet) + len(extra)) + [4]
    return {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": True}


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    return [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def test_llama3_splits_digits_in_threes(tmp_path):
    ours = _write(_byte_level_fields("llama-bpe"))
    assert _pieces(ours, "abc 12345 x") == ["abc", "Ġ", "123", "45", "Ġx"]
    assert _pieces(ours, "I'LL  go\n\n") == ["I", "'LL", "Ġ", "Ġgo", "ĊĊ"]
    hf = _hf_from_fields(tmp_path, _byte_level_fields("llama-bpe"))
    text = "<|begin_of_text|>the 12345 then\n\n 1 <think> x"
    assert ours.encode(text).ids == hf(text)["input_ids"]
    assert ours.encode("12345").tokens == ["<|begin_of_text|>", "123", "45"]  # BOS, as the file says
    # ignore_merges (llama.cpp's, and Llama-3's tokenizer.json): a whole-word vocabulary hit wins.
    assert ours.encode("abc", add_special_tokens=False).tokens == ["abc"]
    assert hf("abc", add_special_tokens=False)["input_ids"] != ours.encode("abc", add_special_tokens=False).ids
    # Without an add_bos_token key, llama.cpp adds BOS for the Llama-3 family (transformers does not).
    fields = {k: v for k, v in _byte_level_fields("llama-bpe").items() if k != "tokenizer.ggml.add_bos_token"}
    assert build_tokenizer_files(fields)["tokenizer_config.json"]["add_bos_token"] is True


def test_qwen2_splits_digits_individually(tmp_path):
    ours = _write(_byte_level_fields("qwen2"))
    assert _pieces(ours, "abc 12345 x") == ["abc", "Ġ", "1", "2", "3", "4", "5", "Ġx"]
    hf = _hf_from_fields(tmp_path, _byte_level_fields("qwen2"))
    for text in ["the 12345 then\n\n 1 <think> abc", "Grüße 😀 x=42\r\n  y"]:
        assert ours.encode(text).ids == hf(text)["input_ids"]
        assert ours.decode(ours.encode(text).ids) == text  # BOS dropped; <think> kept (not special)


def test_gpt2_default_and_unknown_pre(tmp_path):
    assert _pieces(_write(_byte_level_fields("gpt2")), "ab 12345") == ["ab", "Ġ12345"]
    with pytest.warns(UserWarning, match="not known"):
        ours = _write(_byte_level_fields("some-new-model"))
    assert _pieces(ours, "ab 12345") == ["ab", "Ġ12345"]


# ------------------------------------------------------------ synthetic SentencePiece (llama-spm)

@pytest.fixture(scope="module")
def spm_fields() -> dict:
    """A 400-piece SentencePiece BPE with byte fallback, trained here, as llama.cpp exports it."""
    spm = pytest.importorskip("sentencepiece")
    text = (TEXT / "austen_emma.txt").read_text(encoding="utf-8")[:60000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model,
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, user_defined_symbols=["<think>"],
                                   control_symbols=["<|im_end|>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             4 if sp.id_to_piece(i) == "<think>" else 1 for i in range(n)]
    return {"general.architecture": "llama", "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.chat_template": "{{ messages[0]['content'] }}"}


SPM_TEXTS = ["Hello  wörld, é ü 😀 and 123", "Emma Woodhouse, handsome,\nclever  and rich", "x<think>y<|im_end|> z",
             "naïve — Ωμέγα"]


def test_spm_matches_transformers(tmp_path, spm_fields):
    hf = _hf_from_fields(tmp_path, spm_fields)
    ours = _write(spm_fields)
    assert read_gguf_fields(GGUFFile(tmp_path / "ref.gguf"))["tokenizer.ggml.tokens"] == \
        spm_fields["tokenizer.ggml.tokens"]
    for text in SPM_TEXTS:
        for add_special in (True, False):
            assert ours.encode(text, add_special_tokens=add_special).ids == \
                hf(text, add_special_tokens=add_special)["input_ids"], text
    enc = ours.encode("é 😀")
    assert enc.tokens[0] == "<s>" and "<0xF0>" in enc.tokens  # BOS by default; emoji via byte fallback
    for text in SPM_TEXTS[:2] + SPM_TEXTS[3:]:
        assert ours.decode(ours.encode(text).ids) == text


def test_spm_written_dir_and_space_prefix(tmp_path, spm_fields):
    write_tokenizer_files(spm_fields, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok("Hello world")["input_ids"] == _write(spm_fields).encode("Hello world").ids
    assert tok.bos_token == "<s>" and tok.unk_token == "<unk>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    # llama.cpp honours add_space_prefix=false (transformers' GGUF loader ignores it).
    plain = _write({**spm_fields, "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False})
    assert plain.encode("Hello").tokens[0][0] != "▁" and _write(spm_fields).encode("Hello").tokens[1][0] == "▁"
    assert plain.decode(plain.encode("Hello world").ids) == "Hello world"


# --------------------------------------------------------------------------------- errors

def test_errors():
    with pytest.raises(MinikvError, match="no tokenizer"):
        build_tokenizer_files({"general.architecture": "llama"})
    with pytest.raises(MinikvError, match="'bert' is not supported"):
        build_tokenizer_files({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(MinikvError, match="no tokenizer.ggml.merges"):
        build_tokenizer_files({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known pre-tokenizer builds without warnings
        build_tokenizer_files(_byte_level_fields("smollm"))
