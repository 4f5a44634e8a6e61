"""Tokenizers (tokenizer.json or tokenizer.model), BOS/EOS rules, chat templates, streaming decode."""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from .errors import MinikvError

# Used when a model ships no chat template (as llama.cpp does): ChatML, said once on stderr.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinikvError(f"{path}: not valid JSON ({e}); the file is corrupt") from None


def _token_str(v) -> str | None:
    """tokenizer_config special tokens are strings or serialized AddedToken dicts."""
    return v.get("content") if isinstance(v, dict) else v


class _HFJson:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _T

        try:
            self.tok = _T.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on parse errors
            raise MinikvError(f"{path}: cannot load ({e}); the file is corrupt or too new for "
                              "this `tokenizers`") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, s):
        return self.tok.token_to_id(s)


class _SentencePiece:
    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise MinikvError(f"{path}: cannot load ({e}); the file is corrupt") from None
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text, add_special_tokens):
        return self.sp.encode(text)  # BOS is added by Tokenizer from add_bos_token

    def decode(self, ids, skip_special_tokens):
        return self.sp.decode([i for i in ids if not (skip_special_tokens and self.sp.is_control(i))])

    def token_to_id(self, s):
        i = self.sp.piece_to_id(s)
        return None if i == self.sp.unk_id() and s != self.sp.id_to_piece(i) else i


class Tokenizer:
    def __init__(self, impl, config: dict, gen_config: dict, model_config: dict, source: str):
        self.impl, self.source = impl, source
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.bos_id = self._id(self.bos_token) if self.bos_token else gen_config.get("bos_token_id")
        self.add_bos = config.get("add_bos_token")  # None: leave it to tokenizer.json's post-processor
        if isinstance(impl, _SentencePiece) and self.add_bos is None:
            self.add_bos = True  # sentencepiece Llama tokenizers add BOS by default
        eos: set[int] = set()
        for src in (gen_config.get("eos_token_id"), model_config.get("eos_token_id")):
            eos.update(src if isinstance(src, list) else [] if src is None else [src])
        if self.eos_token and self._id(self.eos_token) is not None:
            eos.add(self._id(self.eos_token))
        self.eos_ids = frozenset(int(i) for i in eos)
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self._special = {k: _token_str(v) for k, v in config.items()
                         if k.endswith("_token") and isinstance(_token_str(v), str)}
        self._compiled = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        d = Path(model_dir)
        if (d / "tokenizer.json").is_file():
            impl = _HFJson(d / "tokenizer.json")
        elif (d / "tokenizer.model").is_file():
            impl = _SentencePiece(d / "tokenizer.model")
        else:
            raise MinikvError(f"{d}: no tokenizer.json or tokenizer.model; copy the tokenizer files "
                              "from the original checkpoint")
        config = _read_json(d / "tokenizer_config.json")
        if "chat_template" not in config:  # newer HF checkpoints keep it in its own file
            if (d / "chat_template.jinja").is_file():
                config["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
            elif (d / "chat_template.json").is_file():
                config["chat_template"] = _read_json(d / "chat_template.json").get("chat_template")
        return cls(impl, config, _read_json(d / "generation_config.json"), _read_json(d / "config.json"), str(d))

    @property
    def vocab_size(self) -> int:
        return self.impl.vocab_size

    def _id(self, token: str):
        return self.impl.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(self.impl.encode(text, add_special_tokens))
        if add_special_tokens and self.add_bos is not None and self.bos_id is not None:
            has = bool(ids) and ids[0] == self.bos_id
            if self.add_bos and not has:
                ids.insert(0, self.bos_id)
            elif not self.add_bos and has and isinstance(self.impl, _HFJson):
                ids = ids[1:]  # as HF's update_post_processor: the config flag wins
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.impl.decode(ids, skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as text through the model's jinja chat template (as HF renders it)."""
        if self._compiled is None:
            template = self.chat_template
            if not template:
                print(f"minikv: {self.source} has no chat template; using ChatML", file=sys.stderr)
                template = CHATML
            self._compiled = _compile(template)
        import jinja2

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except jinja2.TemplateError as e:
            raise MinikvError(f"the model's chat template failed: {e}") from None


def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The same environment as transformers' apply_chat_template, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise MinikvError(f"the model's chat template does not parse: {e}") from None


class TextStream:
    """Incremental detokenization: push token ids, get the newly completed text.

    Decodes a short window of ids and emits the growth of the text, holding back while the
    tail is an incomplete UTF-8 sequence (byte-fallback tokens), as vLLM/TGI do. Seeding it
    with the last prompt tokens keeps the first generated word's leading space.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tok = tokenizer
        self.ids = list(context)[-4:]
        self.prefix, self.read = 0, len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""
