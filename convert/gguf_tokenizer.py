"""Rebuild a Hugging Face tokenizer (tokenizer.json + configs) from a GGUF file's metadata.

A GGUF carries no tokenizer.json, only llama.cpp's `tokenizer.ggml.*` keys: the tokens, their
types, scores or merges, the special token ids and a pre-tokenizer *name*. This module turns those
into the three JSON files `transformers.AutoTokenizer.from_pretrained(dir)` loads:

    fields = read_gguf_fields(GGUFFile(path))  # convert/gguf_reader.py
    for name, obj in build_tokenizer_files(fields).items():
        json.dump(obj, open(out / name, "w"), ensure_ascii=False)

Reference behaviour: what transformers' own GGUF loader builds (its `gguf_tokenizer_mapping`), with
the same vocabularies, merges, added tokens and post-processor. Where that loader and llama.cpp
(the GGUF's defining implementation, which there also agrees with the model's original
tokenizer.json) disagree, we follow llama.cpp and say so in a comment; the list is in DEVIATIONS.
"""
from __future__ import annotations

import json
import warnings

from minikv.errors import MinikvError

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

DEVIATIONS = """Differences from transformers' GGUF loader (all following llama.cpp):
* pre in SPLIT_DIGITS_PRE (smollm, starcoder, ...): digits are split one by one before the GPT-2
  regex (llama.cpp's first regex `\\p{N}`, the Digits pre-tokenizer of SmolLM2's original
  tokenizer.json). transformers uses plain GPT-2 ByteLevel, which differs on a run of 2+ spaces
  before a digit: "a  1" is [a, 'ĠĠ', 1] here and in llama.cpp, [a, 'Ġ', 'Ġ', 1] in transformers.
* llama3-family pre: BPE ignore_merges=True (llama.cpp's tokenizer_ignore_merges, and Llama-3's
  tokenizer.json), and add_bos defaults to True when the file has no add_bos_token key.
* llama (SentencePiece): tokenizer.ggml.add_space_prefix=False is honoured (transformers ignores
  it), and the BPE model gets unk_token so a missing <0xNN> byte token maps to <unk>."""

# GPT-2's regex is ByteLevel(use_regex=True)'s built-in one, so it needs no Split of its own.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` names, grouped as llama.cpp's llama-vocab.cpp groups them.
LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
              "lfm2", "jina-v5-nano"}  # llama.cpp also sets ignore_merges and add_bos for these
LLAMA3_REGEX_PRE = {"dbrx", "smaug-bpe"}  # Llama-3's regex only
QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "kormo"}
GPT4O_PRE = {"gpt-4o", "llama4", "minimax-m2"}
SPLIT_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
GPT2_PRE = {"gpt2", "gpt-2", "phi-2", "jina-es", "jina-de", "roberta-bpe", "mpt", "olmo", "jais"}
# Anything else, "default" included (llama.cpp's own default regex differs), warns and uses GPT2_PRE's.


# The tokenizer keys read below, with the type llama.cpp writes ([t]: a list of t). A file that
# disagrees is corrupt; checking here lets the builders trust what they get.
FIELD_TYPES = {
    "tokenizer.ggml.model": str, "tokenizer.ggml.pre": str, "tokenizer.chat_template": str,
    "tokenizer.ggml.tokens": [str], "tokenizer.ggml.merges": [str], "tokenizer.ggml.token_type": [int],
    "tokenizer.ggml.scores": [float], "tokenizer.ggml.bos_token_id": int, "tokenizer.ggml.eos_token_id": int,
    "tokenizer.ggml.unknown_token_id": int, "tokenizer.ggml.padding_token_id": int,
    "tokenizer.ggml.add_bos_token": bool, "tokenizer.ggml.add_eos_token": bool,
    "tokenizer.ggml.add_space_prefix": bool,
}


def read_gguf_fields(gguf_file) -> dict:
    """Every metadata field of a `GGUFFile` (convert/gguf_reader.py) as plain Python: str, int,
    float, bool, or lists (a non-UTF-8 token kept, with U+FFFD). Raises its MinikvError for a
    corrupt file if a tokenizer key has another type than FIELD_TYPES says."""
    fields = gguf_file.fields
    for name, want in FIELD_TYPES.items():
        if name in fields and not _has_type(fields[name], want):
            what = f"list of {want[0].__name__}" if isinstance(want, list) else want.__name__
            raise gguf_file.corrupt(f"metadata {name} is not a {what}")
    if not all(" " in m for m in fields.get("tokenizer.ggml.merges", ())):
        raise gguf_file.corrupt("a tokenizer.ggml.merges entry is not a pair 'a b'")
    return fields


def _has_type(value, want) -> bool:
    if isinstance(want, list):
        return type(value) is list and all(type(v) is want[0] for v in value)
    return type(value) is want


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece vocabularies list no merges: derive them from the scores, best first
    (transformers' `generate_merges`, so that the BPE result is the same as theirs)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for merge, score in zip(tokens, scores):
        local = [(merge[:i], merge[i:], score) for i in range(1, len(merge))
                 if merge[:i] in vocab and merge[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    # stable sort, reversed: equal keys keep their vocabulary order, as in transformers
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _token_at(tokens: list[str], fields: dict, key: str) -> str | None:
    tid = fields.get(f"tokenizer.ggml.{key}")
    if tid is None or not 0 <= int(tid) < len(tokens):  # some files write -1 / 2**32-1 for "none"
        return None
    return tokens[int(tid)]


def _byte_level_pre(pre: str):
    """(pre-tokenizer, ignore_merges) for a byte-level BPE vocabulary's `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers as pt

    def split(regex):  # transformers' (and the original tokenizer.json's) shape for these models
        return pt.Sequence([pt.Split(Regex(regex), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    if pre in LLAMA3_PRE or pre in LLAMA3_REGEX_PRE:
        return split(_LLAMA3_SPLIT), pre in LLAMA3_PRE
    if pre in QWEN2_PRE:
        return split(_QWEN2_SPLIT), False
    if pre in GPT4O_PRE:
        return split(_GPT4O_SPLIT), False
    byte_level = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in SPLIT_DIGITS_PRE:  # llama.cpp: "\p{N}" first, then GPT-2's regex on each piece
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level]), False
    if pre not in GPT2_PRE:
        warnings.warn(f"GGUF tokenizer.ggml.pre={pre!r} is not known to minikv; using GPT-2's "
                      "pre-tokenizer (as transformers does), so tokenization may differ from "
                      "llama.cpp's", stacklevel=4)
    return byte_level, False


def _build_byte_level(fields: dict, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models

    # Tokens are stored in GPT-2's byte alphabet; one that is not (rare: raw text in the file) is
    # respelled byte by byte, as transformers does.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = fields.get("tokenizer.ggml.merges")
    if not merges:
        raise MinikvError("the GGUF has a gpt2 (byte-level BPE) vocabulary but no tokenizer.ggml.merges; "
                          "it is malformed: re-convert it with a current llama.cpp")
    pre = str(fields.get("tokenizer.ggml.pre") or "default")
    pre_tokenizer, ignore_merges = _byte_level_pre(pre)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would
    # grow the vocabulary past the model's, so it is skipped (as transformers does).
    return tok, (lambda t: set(t) <= alphabet), set(vocab)


def _build_sentencepiece(fields: dict, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers as pt

    scores = fields.get("tokenizer.ggml.scores")
    if fields.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    elif scores is not None and len(scores) == len(tokens):
        merges = _merges_from_scores(tokens, [float(s) for s in scores])
    else:
        raise MinikvError("the GGUF has a llama (SentencePiece) vocabulary without tokenizer.ggml.scores; "
                          "it is malformed: re-convert it with a current llama.cpp")
    vocab = {t: i for i, t in enumerate(tokens)}
    add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=_token_at(tokens, fields, "unknown_token_id"),
                               fuse_unk=True, byte_fallback=True))
    # "first": the prefix space goes only before the text's start, not after each special token
    # (transformers' non-legacy Llama; llama.cpp also adds one after a special token).
    tok.pre_tokenizer = pt.Metaspace(replacement="▁", prepend_scheme="first" if add_prefix else "never",
                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return tok, (lambda t: True), set(vocab)


def _post_processor(bos: str | None, bos_id, eos: str | None, eos_id, add_bos: bool, add_eos: bool):
    """TemplateProcessing exactly as transformers' `TokenizersBackend.update_post_processor`."""
    from tokenizers import processors

    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, int(bos_id))] if add_bos else []) + ([(eos, int(eos_id))] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def build_tokenizer_files(fields: dict) -> dict[str, object]:
    """fields: GGUF metadata key -> python value (see `read_gguf_fields`).
    Returns {"tokenizer.json": dict, "tokenizer_config.json": dict, "special_tokens_map.json": dict},
    each ready for json.dump. Raises MinikvError for a vocabulary type that is not supported."""
    from tokenizers import AddedToken

    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise MinikvError("the GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing); "
                          "pass a model directory with a tokenizer.json instead")
    tokens = [str(t) for t in tokens]
    if model == "gpt2":
        tok, spelled_ok, vocab_keys = _build_byte_level(fields, tokens)
    elif model == "llama":
        tok, spelled_ok, vocab_keys = _build_sentencepiece(fields, tokens)
    else:
        raise MinikvError(f"GGUF tokenizer model {model!r} is not supported (minikv handles 'gpt2' byte-level "
                          "BPE and 'llama' SentencePiece); use the model's original HF tokenizer files instead")

    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    named = {k: _token_at(tokens, fields, key) for k, key in
             (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"))}
    # Control tokens, plus the named special ones (an <unk> is type UNKNOWN, not CONTROL), become
    # special added tokens so they are matched whole and skipped when decoding.
    special = [t for t, ty in zip(tokens, types) if ty == CONTROL and spelled_ok(t)]
    special += [t for t in named.values() if t is not None and t not in special and spelled_ok(t)]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    # User-defined tokens (like <think>) are matched whole by llama.cpp but are not special.
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab_keys and t not in special]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    pre = str(fields.get("tokenizer.ggml.pre") or "")
    # llama.cpp's defaults when the file does not say: BOS for SentencePiece and Llama-3 vocabularies.
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama" or pre in LLAMA3_PRE))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _post_processor(named["bos"], fields.get("tokenizer.ggml.bos_token_id"),
                                         named["eos"], fields.get("tokenizer.ggml.eos_token_id"),
                                         add_bos, add_eos)

    special_map = {f"{k}_token": v for k, v in named.items() if v is not None}
    config = {
        # Loads as transformers' generic fast tokenizer from tokenizer.json, in v4 and v5 alike
        # (v5 aliases PreTrainedTokenizerFast to TokenizersBackend, which its GGUF path uses).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    arch = fields.get("general.architecture")
    if isinstance(fields.get(f"{arch}.context_length"), int):
        config["model_max_length"] = fields[f"{arch}.context_length"]
    if fields.get("tokenizer.chat_template"):
        config["chat_template"] = fields["tokenizer.chat_template"]
    return {"tokenizer.json": json.loads(tok.to_str()),
            "tokenizer_config.json": config,
            "special_tokens_map.json": special_map}


def write_tokenizer_files(fields: dict, out_dir) -> None:
    """build_tokenizer_files, written into out_dir (which must exist)."""
    from pathlib import Path

    for name, obj in build_tokenizer_files(fields).items():
        with open(Path(out_dir) / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2)
