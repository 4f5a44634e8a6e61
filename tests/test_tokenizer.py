"""Tokenizer wrapper: BOS rules, chat templates rendered as HF renders them, streaming decode."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import STORIES
from minikv.errors import MinikvError
from minikv.generate import StopStrings
from minikv.tokenizer import TextStream, Tokenizer

LLAMA3ISH = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}"
    "{{ '<|start|>' + m['role'] + '\n\n' + m['content'] | trim + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant\n\n' }}{% endif %}")
FANCY = (  # trim_blocks/lstrip_blocks, loop controls, tojson with non-ASCII, namespace
    "{%- set ns = namespace(n=0) -%}\n"
    "{% for m in messages %}\n"
    "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
    "  {%- set ns.n = ns.n + 1 %}\n"
    "[{{ ns.n }}] {{ m | tojson }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}>>{% endif %}")


@pytest.fixture
def tokdir(tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(STORIES, d)
    return d


def set_template(d, template):
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo  there "},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Tell me a story 📚"}]


@pytest.mark.parametrize("template", [LLAMA3ISH, FANCY])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_renders_like_hf(tokdir, template, gen_prompt):
    from transformers import AutoTokenizer

    set_template(tokdir, template)
    ours = Tokenizer.from_dir(tokdir).render_chat(MESSAGES, add_generation_prompt=gen_prompt)
    hf = AutoTokenizer.from_pretrained(tokdir).apply_chat_template(MESSAGES, tokenize=False,
                                                                   add_generation_prompt=gen_prompt)
    assert ours == hf


def test_chat_template_from_jinja_file(tokdir):
    (tokdir / "chat_template.jinja").write_text(LLAMA3ISH)
    assert Tokenizer.from_dir(tokdir).render_chat(MESSAGES[:2]).startswith("<s><|start|>system")


def test_template_errors_are_clear(tokdir):
    set_template(tokdir, LLAMA3ISH)
    with pytest.raises(MinikvError, match="bad role"):
        Tokenizer.from_dir(tokdir).render_chat([{"role": "tool", "content": "x"}])
    set_template(tokdir, "{% for %}")
    with pytest.raises(MinikvError, match="does not parse"):
        Tokenizer.from_dir(tokdir).render_chat(MESSAGES)


def test_no_template_falls_back_to_chatml(capsys):
    text = Tokenizer.from_dir(STORIES).render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "no chat template" in capsys.readouterr().err


def test_bos_and_eos_rules(tokdir):
    tok = Tokenizer.from_dir(tokdir)
    assert tok.eos_ids == {2}
    assert tok.encode("Once")[0] == 1 and tok.encode("Once", add_special_tokens=False)[0] != 1
    cfg = json.loads((tokdir / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False  # the config flag wins over tokenizer.json's post-processor (as HF)
    (tokdir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tokdir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_dir(tokdir)
    assert tok.encode("Once")[0] != 1
    assert tok.eos_ids == {2, 7}


def test_text_stream_matches_full_decode():
    tok = Tokenizer.from_dir(STORIES)
    text = "Lily saw a café, naïve 🐶 bird! \n\n  Then  she ran."
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.decode([i]) == "\ufffd" or not tok.decode([i]) for i in ids)  # byte-fallback pieces
    prompt = tok.encode("Once upon a time")
    s = TextStream(tok, prompt)
    streamed = "".join(s.push(i) for i in ids)
    full = tok.decode(prompt + ids)
    assert full.startswith(tok.decode(prompt)) and streamed == full[len(tok.decode(prompt)):]
    assert "\ufffd" not in streamed


def test_stop_strings_hold_back_and_cut():
    s = StopStrings(["<END>", "\n\n"])
    out = []
    for piece in ["Hello <", "E", "ND", "> more"]:
        text, hit = s.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello " and hit
    s = StopStrings(["<END>"])
    assert s.feed("a <E") == ("a ", False) and s.feed("x") == ("<Ex", False)


def test_sentencepiece_tokenizer_model(tmp_path):
    """A directory with tokenizer.model (no tokenizer.json) goes through sentencepiece, with
    BOS added by default as Llama's sentencepiece tokenizers do."""
    import sentencepiece as spm

    from conftest import TEXT

    text = (TEXT / "tinystories_valid_fragment.txt").read_text(encoding="utf-8")[:20000]
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2,
                                   unk_id=0, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer.from_dir(tmp_path)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    s = "Once upon a time, Lily saw a café 🐶."
    assert tok.encode(s) == [1] + ref.encode(s)
    assert tok.decode(tok.encode(s)) == s
    assert tok.eos_ids == {2}
    stream = TextStream(tok, tok.encode("Once"))
    ids = tok.encode(" upon a café 🐶", add_special_tokens=False)
    assert "".join(stream.push(i) for i in ids) == tok.decode(tok.encode("Once") + ids)[len("Once"):]
