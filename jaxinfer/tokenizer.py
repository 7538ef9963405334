"""Tokenizers behind one interface: HF tokenizer.json, GGUF-embedded vocabularies, SentencePiece, llama2.c.

Three implementations share the `Tokenizer` interface:

- `HFTokenizer` wraps a `tokenizers.Tokenizer`: an HF `tokenizer.json`, or a byte-level BPE
  vocabulary rebuilt from a GGUF file (`tokenizer.ggml.model == "gpt2"`).
- `ScoredBPETokenizer` implements llama2.c's encoder over a vocabulary of scored pieces: llama2.c's
  `tokenizer.bin` and GGUF SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`).
- `SentencePieceTokenizer` wraps a SentencePiece `.model` file.

`Tokenizer.save` writes a tokenizer's files into a directory and returns a JSON-serialisable
metadata dict with a "kind" key, and `load_tokenizer` restores the tokenizer from both.
"""

from __future__ import annotations

import abc
import functools
import heapq
import json
import logging
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

# SentencePiece writes a space inside a piece as U+2581 (LOWER ONE EIGHTH BLOCK).
SPIECE_SPACE = "\u2581"

# GGUF token types (tokenizer.ggml.token_type), the values of gguf.TokenType and llama.cpp.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer(abc.ABC):
    """Text to token ids and back, with the special ids generation needs."""

    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None
    # Text of the BOS and EOS tokens, passed to chat templates as `bos_token` and `eos_token`.
    bos_token: str | None = None
    eos_token: str | None = None
    # Whether `encode` turns the text of special tokens (such as the BOS text) into their ids.
    parses_special_tokens: bool = True

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Encode text; `add_bos=None` follows the tokenizer's own default."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, skipping special tokens."""

    @abc.abstractmethod
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the tokenizer's files into `directory`; return the metadata `load` needs."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, special tokens included."""

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        """Prepend BOS to `ids` when `add_bos` is set; raise ValueError if there is no BOS."""
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no BOS token; pass add_bos=False")
        return [self.bos_id, *ids]

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """Render `messages` with the tokenizer's chat template, as HF transformers does.

        The template receives `messages`, `add_generation_prompt`, `bos_token` and `eos_token` (those
        that are set), the functions `raise_exception` and `strftime_now`, and any extra
        `variables` (for example `tools`). A `raise_exception` call in the template raises
        `jinja2.TemplateError` with the template's message.
        """
        if not self.chat_template:
            raise ValueError(
                f"{type(self).__name__} has no chat template; pass a prompt without chat formatting, "
                "or load a tokenizer whose tokenizer_config.json, chat_template.jinja or GGUF "
                "metadata (tokenizer.chat_template) contains one"
            )
        if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TypeError(
                    f"messages[{index}] must be a dict with 'role' and 'content', got {message!r}"
                )

        context: dict[str, Any] = {}
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        context.update(variables)
        context["messages"] = [dict(message) for message in messages]
        context["add_generation_prompt"] = add_generation_prompt
        return _compile_chat_template(self.chat_template).render(**context)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render `messages` with the chat template and encode the prompt.

        Templates such as Llama 3's write the BOS token text themselves. When the prompt starts with
        that text, the encoder turns it into the BOS id, and no other BOS is added. Otherwise BOS is
        added when the tokenizer adds it by default. So BOS never appears twice.
        """
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        template_wrote_bos = bool(self.bos_token) and prompt.startswith(self.bos_token)
        if template_wrote_bos and not self.parses_special_tokens:
            # This encoder would spell the BOS text out as characters, so it adds the BOS id instead.
            return self.encode(prompt[len(self.bos_token):], add_bos=True)
        return self.encode(prompt, add_bos=self.add_bos and not template_wrote_bos)


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """The `{% generation %}` block, which transformers uses to mark assistant text; renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML. Chat templates expect plain JSON, which
    # is what transformers' replacement filter writes.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    # Chat templates ship with downloaded models, so they run in Jinja's immutable sandbox. The
    # options (trim_blocks, lstrip_blocks, loop controls) are the ones transformers renders with.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)


# --------------------------------------------------------------------------------------------
# HF tokenizers
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _token_content(value: Any) -> str | None:
    """Return a special token's text, written in tokenizer_config.json as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, str):
        return value
    return None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(item) for item in value]


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for token_id in ids:
        if token_id is not None:
            seen.setdefault(int(token_id), None)
    return tuple(seen)


def _chat_template_from_config(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):
        # Older transformers versions store named templates as [{"name": ..., "template": ...}].
        named = {entry.get("name"): entry.get("template") for entry in template}
        return named.get("default")
    return template


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (HF tokenizer.json) with the special tokens generation needs.

    BOS follows the tokenizer's post-processor, as in transformers 5: Llama 3 style tokenizers add
    `<|begin_of_text|>` through a TemplateProcessing post-processor, while SmolLM2 and Qwen2 add
    nothing.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_ids: Sequence[int] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_id = self._token_id(bos_token, "bos_token")
        eos_token_id = self._token_id(eos_token, "eos_token")
        self.eos_ids = _unique([*(eos_ids or ()), eos_token_id])
        self.add_bos = self._post_processor_adds_bos()

    def _token_id(self, token: str | None, name: str) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            logger.warning("%s %r is not in the vocabulary; it is ignored", name, token)
        return token_id

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        with_specials = self.tokenizer.encode("a", add_special_tokens=True).ids
        without_specials = self.tokenizer.encode("a", add_special_tokens=False).ids
        return with_specials[:1] == [self.bos_id] and without_specials[:1] != [self.bos_id]

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> HFTokenizer:
        """Load a bare tokenizer.json; `kwargs` are the constructor's keyword arguments."""
        from tokenizers import Tokenizer as BackendTokenizer

        return cls(BackendTokenizer.from_file(str(path)), **kwargs)

    @classmethod
    def from_directory(cls, path: str | Path) -> HFTokenizer:
        """Load an HF model or tokenizer directory.

        Reads tokenizer.json (required), tokenizer_config.json and special_tokens_map.json for the
        BOS and EOS tokens, the chat template from chat_template.jinja (transformers 5) or
        tokenizer_config.json, and extra EOS ids from generation_config.json and config.json.
        """
        from tokenizers import Tokenizer as BackendTokenizer

        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(
                f"no tokenizer.json in {directory}; pass an HF model directory, a SentencePiece "
                ".model file or a llama2.c tokenizer.bin"
            )
        backend = BackendTokenizer.from_file(str(tokenizer_file))

        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        special_tokens_map = _read_json(directory / "special_tokens_map.json")
        model_config = _read_json(directory / "config.json")
        generation_config = _read_json(directory / "generation_config.json")

        def special_token(name: str) -> str | None:
            found = _token_content(tokenizer_config.get(name))
            return found if found is not None else _token_content(special_tokens_map.get(name))

        _mark_special_tokens(backend, _named_special_tokens(tokenizer_config, special_tokens_map))

        template_file = directory / "chat_template.jinja"
        if template_file.exists():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _chat_template_from_config(tokenizer_config)

        bos_token = special_token("bos_token")
        if bos_token is None and model_config.get("bos_token_id") is not None:
            bos_token = backend.id_to_token(int(model_config["bos_token_id"]))
        eos_ids = [
            *_as_id_list(generation_config.get("eos_token_id")),
            *_as_id_list(model_config.get("eos_token_id")),
        ]
        tokenizer = cls(
            backend,
            bos_token=bos_token,
            eos_token=special_token("eos_token"),
            eos_ids=eos_ids,
            chat_template=chat_template,
        )
        # transformers 5 ignores add_bos_token when tokenizer.json exists, so the post-processor
        # decides. This loader does the same and warns when the two disagree.
        configured_bos = tokenizer_config.get("add_bos_token")
        if configured_bos is not None and bool(configured_bos) != tokenizer.add_bos:
            logger.warning(
                "%s: tokenizer_config.json sets add_bos_token=%s but tokenizer.json's post-processor "
                "%s BOS; following the post-processor, as transformers 5 does",
                directory, configured_bos, "adds" if tokenizer.add_bos else "does not add",
            )
        return tokenizer

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Encode text like transformers' `encode`.

        With `add_bos=None` the post-processor runs, so the ids equal transformers'
        `encode(text)`. An explicit `add_bos` skips the post-processor: the ids are the text's
        tokens, with the BOS id first when `add_bos` is True.
        """
        if add_bos is None:
            return list(self.tokenizer.encode(text, add_special_tokens=True).ids)
        return self._with_bos(list(self.tokenizer.encode(text, add_special_tokens=False).ids), add_bos)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(token_id) for token_id in ids], skip_special_tokens=True)

    def save(self, directory: Path) -> dict[str, Any]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        return {
            "kind": "hf",
            "tokenizer_file": "tokenizer.json",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }


def _named_special_tokens(*configs: dict[str, Any]) -> list[str]:
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    tokens: list[str] = []
    for config in configs:
        for name in names:
            content = _token_content(config.get(name))
            if content is not None:
                tokens.append(content)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = config.get(key)
            if isinstance(extra, dict):
                extra = list(extra.values())
            for value in extra or ():
                content = _token_content(value)
                if content is not None:
                    tokens.append(content)
    return tokens


def _mark_special_tokens(backend: Any, tokens: Iterable[str]) -> None:
    """Register vocabulary tokens named special in the configs as special added tokens.

    transformers does the same on load, so such a token is matched whole in text and skipped by
    `decode`. A name missing from the vocabulary is left out rather than given a new id the model
    has no embedding for.
    """
    from tokenizers import AddedToken

    already_special = {
        token.content for token in backend.get_added_tokens_decoder().values() if token.special
    }
    to_add = []
    for content in dict.fromkeys(tokens):
        if content in already_special:
            continue
        if backend.token_to_id(content) is None:
            logger.warning("special token %r is not in the vocabulary; it is ignored", content)
            continue
        to_add.append(AddedToken(content, special=True, normalized=False))
    if to_add:
        backend.add_special_tokens(to_add)


# --------------------------------------------------------------------------------------------
# GGUF byte-level BPE ("gpt2")
# --------------------------------------------------------------------------------------------

# Split patterns of the pre-tokenizers llama.cpp names in tokenizer.ggml.pre. Llama 3 uses the
# cl100k pattern, which keeps numbers in groups of up to three digits. Qwen2 splits every digit.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_FAMILIES = {
    "default": "gpt2",
    "gpt2": "gpt2",
    "smollm": "smollm",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
}


class _ByteLevelStyle(NamedTuple):
    """The text splitting, BPE option and BOS default of one GGUF pre-tokenizer family."""

    normalizer: Any
    pre_tokenizer: Any
    ignore_merges: bool
    add_bos_default: bool


def _byte_level_style(pre: str) -> _ByteLevelStyle:
    """Return the normalizer, pre-tokenizer and defaults llama.cpp uses for `tokenizer.ggml.pre`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    family = _PRE_TOKENIZER_FAMILIES.get(pre)
    if family is None:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
            f"{sorted(_PRE_TOKENIZER_FAMILIES)}. Load the model's HF tokenizer.json instead, "
            "or add the pre-tokenizer's split pattern to jaxinfer.tokenizer"
        )
    if family == "gpt2":
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return _ByteLevelStyle(None, pre_tokenizer, ignore_merges=False, add_bos_default=False)
    if family == "smollm":
        # llama.cpp's "smollm" pre-tokenizer isolates every digit before GPT-2's split.
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        return _ByteLevelStyle(None, pre_tokenizer, ignore_merges=False, add_bos_default=False)

    pattern = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    if family == "llama3":
        # llama.cpp sets ignore_merges for Llama 3, so a pre-token that is a whole vocabulary
        # entry becomes that token without running the merges. It also adds BOS by default.
        return _ByteLevelStyle(None, pre_tokenizer, ignore_merges=True, add_bos_default=True)
    # Qwen2's own tokenizer (transformers' Qwen2Tokenizer) NFC-normalises text first. The GGUF
    # loader of transformers 5 does not, so it differs from Qwen2Tokenizer on text not in NFC.
    return _ByteLevelStyle(normalizers.NFC(), pre_tokenizer, ignore_merges=False, add_bos_default=False)


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[int, str]:
    """Return GPT-2's map from each byte to the printable character byte-level BPE spells it with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {byte: chr(byte) for byte in printable}
    next_code = 256
    for byte in range(256):
        if byte not in alphabet:
            alphabet[byte] = chr(next_code)
            next_code += 1
    return alphabet


def _metadata_list(meta: Mapping[str, Any], key: str) -> list[Any]:
    value = meta.get(key)
    if value is None:
        raise ValueError(f"GGUF metadata has no {key}; the file does not embed a tokenizer")
    return list(value)


def _byte_level_from_gguf(meta: Mapping[str, Any]) -> HFTokenizer:
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as BackendTokenizer

    tokens = [str(token) for token in _metadata_list(meta, "tokenizer.ggml.tokens")]
    token_types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    merges_text = _metadata_list(meta, "tokenizer.ggml.merges")
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    style = _byte_level_style(pre)

    # Normal tokens are spelled in GPT-2's byte alphabet. One that is not (a few converters write
    # raw text) is respelled from its UTF-8 bytes. Control and user-defined tokens keep their
    # text because they are matched whole in the input.
    alphabet = _byte_level_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        if token_type == TOKEN_NORMAL and not set(token) <= spelled:
            token = "".join(alphabet[byte] for byte in token.encode("utf-8"))
        if token in vocab:
            logger.warning("GGUF vocabulary repeats token %r (ids %d and %d); encode never produces id %d",
                           token, vocab[token], token_id, token_id)
            continue
        vocab[token] = token_id

    merges: list[tuple[str, str]] = []
    for merge in merges_text:
        parts = str(merge).split(" ")
        if len(parts) != 2:
            raise ValueError(f"invalid GGUF merge {merge!r}: expected two tokens separated by one space")
        merges.append((parts[0], parts[1]))

    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=style.ignore_merges,
                                          fuse_unk=False, byte_fallback=False))
    backend.normalizer = style.normalizer
    backend.pre_tokenizer = style.pre_tokenizer
    backend.decoder = decoders.ByteLevel()

    control = [AddedToken(token, special=True, normalized=False)
               for token, token_type in zip(tokens, token_types, strict=True)
               if token_type == TOKEN_CONTROL]
    user_defined = [AddedToken(token, special=False, normalized=False)
                    for token, token_type in zip(tokens, token_types, strict=True)
                    if token_type == TOKEN_USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user_defined:
        backend.add_tokens(user_defined)

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    bos_token = tokens[bos_id] if bos_id is not None else None
    eos_token = tokens[eos_id] if eos_id is not None else None
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", style.add_bos_default)) and bos_token is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_token is not None
    # The post-processor adds BOS and EOS as the GGUF metadata specifies, so the backend alone encodes
    # the same ids as the wrapper.
    template = ["$A:0"]
    specials = []
    if add_bos:
        template.insert(0, f"{bos_token}:0")
        specials.append((bos_token, int(bos_id)))
    if add_eos:
        template.append(f"{eos_token}:0")
        specials.append((eos_token, int(eos_id)))
    backend.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=specials)

    return HFTokenizer(
        backend,
        bos_token=bos_token,
        eos_token=eos_token,
        eos_ids=_gguf_eos_ids(meta),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _gguf_eos_ids(meta: Mapping[str, Any]) -> list[int]:
    # llama.cpp ends generation on EOS and also on the end-of-turn and end-of-message tokens.
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    return [int(meta[key]) for key in keys if meta.get(key) is not None]


# --------------------------------------------------------------------------------------------
# Scored BPE (llama2.c, GGUF "llama")
# --------------------------------------------------------------------------------------------


class ScoredBPETokenizer(Tokenizer):
    """llama2.c's BPE over a vocabulary of scored pieces with byte-fallback pieces `<0x00>`..`<0xFF>`.

    Pieces spell a space as " " (llama2.c's convention), not SentencePiece's U+2581. Encoding
    follows llama2.c. It prefixes a space to non-empty text and looks up each UTF-8 character,
    falling back to the byte pieces of its bytes. Then it repeatedly merges the adjacent pair whose
    concatenation is the piece with the highest score, taking the leftmost pair on ties. Only
    normal and user-defined pieces take part in the lookup and the merges.

    `special_ids` lists the pieces matched whole in the text before encoding (GGUF control and
    user-defined tokens). llama2.c matches none. As in llama.cpp, the space prefix goes before
    the text at the start and before text that follows a special piece, so "<s>[INST]" encodes
    "[INST]" as " [INST]", as Meta's Llama 2 `chat_completion` (meta-llama/llama,
    llama/generation.py) encodes each turn separately with sentencepiece.
    """

    def __init__(
        self,
        pieces: Sequence[str],
        scores: Sequence[float],
        *,
        token_types: Sequence[int] | None = None,
        bos_id: int | None = 1,
        eos_ids: Sequence[int] = (2,),
        add_bos: bool = True,
        add_space_prefix: bool = True,
        special_ids: Sequence[int] = (),
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        if len(pieces) != len(scores):
            raise ValueError(f"got {len(pieces)} pieces but {len(scores)} scores; pass one score per piece")
        self.pieces = [str(piece) for piece in pieces]
        self.scores = [float(score) for score in scores]
        if token_types is None:
            token_types = _infer_token_types(self.pieces, bos_id, eos_ids)
        if len(token_types) != len(self.pieces):
            raise ValueError(
                f"got {len(self.pieces)} pieces but {len(token_types)} token types; pass one type per piece"
            )
        self.token_types = [int(token_type) for token_type in token_types]
        self.bos_id = bos_id
        self.eos_ids = _unique(eos_ids)
        self.add_bos = add_bos
        self.add_space_prefix = add_space_prefix
        self.special_ids = tuple(int(token_id) for token_id in special_ids)
        self.chat_template = chat_template
        self.bos_token = bos_token if bos_token is not None else self._piece_text(bos_id)
        if eos_token is None and self.eos_ids:
            eos_token = self._piece_text(self.eos_ids[0])
        self.eos_token = eos_token

        # Lookup for characters and merges: the first id of each normal or user-defined piece.
        self._piece_ids: dict[str, int] = {}
        for token_id, (piece, token_type) in enumerate(zip(self.pieces, self.token_types, strict=True)):
            if token_type in (TOKEN_NORMAL, TOKEN_USER_DEFINED):
                self._piece_ids.setdefault(piece, token_id)
        self._byte_ids: dict[int, int] = {}
        self._byte_of_id: dict[int, int] = {}
        for token_id, (piece, token_type) in enumerate(zip(self.pieces, self.token_types, strict=True)):
            match = BYTE_PIECE.fullmatch(piece)
            if token_type == TOKEN_BYTE and match:
                byte = int(match.group(1), 16)
                self._byte_ids.setdefault(byte, token_id)
                self._byte_of_id[token_id] = byte
        unknown = [i for i, token_type in enumerate(self.token_types) if token_type == TOKEN_UNKNOWN]
        self.unk_id = unknown[0] if unknown else None
        self._skipped_ids = frozenset(
            i for i, token_type in enumerate(self.token_types)
            if token_type in (TOKEN_CONTROL, TOKEN_UNKNOWN)
        )
        self._special_pattern = _alternation([self.pieces[i] for i in self.special_ids])
        self.parses_special_tokens = self._special_pattern is not None
        self._special_piece_ids = {self.pieces[i]: i for i in reversed(self.special_ids)}
        # Ids after which the encoder adds the space prefix, so the decoder removes it there.
        self._prefix_ids = frozenset([*self.special_ids, *([bos_id] if bos_id is not None else [])])

    def _piece_text(self, token_id: int | None) -> str | None:
        if token_id is None or not 0 <= token_id < len(self.pieces):
            return None
        # llama2.c's export writes BOS and EOS as "\n<s>\n" and "\n</s>\n".
        return self.pieces[token_id].strip()

    # ---- loading ----

    @classmethod
    def from_llama2c_file(
        cls,
        path: str | Path,
        *,
        bos_id: int = 1,
        eos_ids: Sequence[int] = (2, 1),
        add_bos: bool = True,
    ) -> ScoredBPETokenizer:
        """Read llama2.c's tokenizer.bin.

        The format is an int32 max_token_length, then per token a float32 score, an int32 byte
        length and the UTF-8 bytes (little-endian). The vocabulary size is the number of records.
        `eos_ids` defaults to (2, 1) because llama2.c's `run` also stops generating when the model
        emits BOS (id 1).
        """
        data = Path(path).read_bytes()
        if len(data) < 4:
            raise ValueError(f"{path}: {len(data)} bytes is too short for a llama2.c tokenizer.bin")
        offset = 4
        pieces: list[str] = []
        scores: list[float] = []
        while offset < len(data):
            if offset + 8 > len(data):
                raise ValueError(
                    f"{path}: truncated record header at byte {offset}; "
                    "the file is not a llama2.c tokenizer.bin"
                )
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if length < 0 or offset + length > len(data):
                raise ValueError(
                    f"{path}: token {len(pieces)} has invalid length {length} at byte {offset - 4}; "
                    "the file is not a llama2.c tokenizer.bin"
                )
            pieces.append(data[offset:offset + length].decode("utf-8", errors="surrogateescape"))
            scores.append(score)
            offset += length
        return cls(pieces, scores, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos)

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any]) -> ScoredBPETokenizer:
        """Build the tokenizer of a GGUF whose `tokenizer.ggml.model` is "llama" (SentencePiece BPE)."""
        tokens = [str(token) for token in _metadata_list(meta, "tokenizer.ggml.tokens")]
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        token_types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        pieces = [token.replace(SPIECE_SPACE, " ") for token in tokens]
        special_ids = [i for i, token_type in enumerate(token_types)
                       if token_type in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            pieces,
            scores,
            token_types=token_types,
            bos_id=int(bos_id) if bos_id is not None else None,
            eos_ids=_gguf_eos_ids(meta),
            # Without the key, BOS is added, as transformers' GGUF loader does for SentencePiece vocabularies.
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            special_ids=special_ids,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=tokens[bos_id] if bos_id is not None else None,
            eos_token=tokens[eos_id] if eos_id is not None else None,
        )

    # ---- encoding ----

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Encode text with llama2.c's algorithm; special pieces in the text become their ids."""
        add_bos = self.add_bos if add_bos is None else add_bos
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token; pass add_bos=False")
            ids.append(self.bos_id)
        # NOTE: transformers 5 (Metaspace, prepend_scheme="first") adds the space prefix only at
        # the start of text that does not already start with a space. This encoder follows llama.cpp
        # and sentencepiece instead, so such texts and text after special pieces differ from it.
        after_special = True
        for fragment, special_id in self._split_special(text):
            if special_id is not None:
                ids.append(special_id)
                after_special = True
            else:
                ids.extend(self._encode_fragment(fragment, self.add_space_prefix and after_special))
                after_special = False
        return ids

    def _split_special(self, text: str) -> list[tuple[str, int | None]]:
        """Split text into ordinary fragments (id None) and special pieces (with their id)."""
        if self._special_pattern is None:
            return [(text, None)] if text else []
        fragments: list[tuple[str, int | None]] = []
        position = 0
        for match in self._special_pattern.finditer(text):
            if match.start() > position:
                fragments.append((text[position:match.start()], None))
            fragments.append((match.group(), self._special_piece_ids[match.group()]))
            position = match.end()
        if position < len(text):
            fragments.append((text[position:], None))
        return fragments

    def _encode_fragment(self, text: str, prefix_space: bool) -> list[int]:
        if not text:
            return []
        if prefix_space:
            text = " " + text

        symbols: list[int] = []
        for character in text:
            token_id = self._piece_ids.get(character)
            if token_id is not None:
                symbols.append(token_id)
                continue
            for byte in character.encode("utf-8", errors="surrogatepass"):
                byte_id = self._byte_ids.get(byte, self.unk_id)
                if byte_id is None:
                    raise ValueError(
                        f"cannot encode {character!r}: the vocabulary has no piece for it, no byte "
                        f"piece <0x{byte:02X}> and no unknown token; use a vocabulary with byte fallback"
                    )
                symbols.append(byte_id)
        return self._merge(symbols)

    def _merge(self, symbols: list[int]) -> list[int]:
        """Apply llama2.c's merge loop with a heap instead of a rescan per merge (same result)."""
        count = len(symbols)
        following = list(range(1, count + 1))  # index of the next live symbol, or count at the end
        preceding = list(range(-1, count - 1))
        alive = [True] * count
        heap: list[tuple[float, int, int, int, int]] = []

        def push(left: int) -> None:
            right = following[left]
            if right >= count:
                return
            merged = self._piece_ids.get(self.pieces[symbols[left]] + self.pieces[symbols[right]])
            if merged is not None:
                # Highest score first, then the leftmost pair, as llama2.c's linear scan picks.
                heapq.heappush(heap, (-self.scores[merged], left, symbols[left], symbols[right], merged))

        for index in range(count - 1):
            push(index)
        while heap:
            _, left, left_id, right_id, merged = heapq.heappop(heap)
            right = following[left]
            stale = (not alive[left] or right >= count or symbols[left] != left_id
                     or symbols[right] != right_id)
            if stale:
                continue
            symbols[left] = merged
            alive[right] = False
            following[left] = following[right]
            if following[right] < count:
                preceding[following[right]] = left
            if preceding[left] >= 0:
                push(preceding[left])
            push(left)
        return [symbol for symbol, live in zip(symbols, alive, strict=True) if live]

    # ---- decoding ----

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids, skipping control and unknown tokens.

        As llama2.c prints text, a piece at the start of `ids` or right after BOS loses its
        leading space (the space prefix added by `encode`), and so does a piece after a special
        piece, where `encode` adds the prefix too. Byte pieces become their bytes, and the
        bytes are decoded as UTF-8 with invalid sequences replaced by U+FFFD. llama2.c instead
        drops each non-printable single byte it prints, so it prints nothing for a character
        encoded through byte fallback.
        """
        output = bytearray()
        at_start = True
        for raw_id in ids:
            token_id = int(raw_id)
            if not 0 <= token_id < len(self.pieces):
                raise ValueError(
                    f"token id {token_id} is outside the vocabulary of {len(self.pieces)} pieces"
                )
            if token_id in self._skipped_ids:
                at_start = at_start or token_id in self._prefix_ids
                continue
            byte = self._byte_of_id.get(token_id)
            if byte is not None:
                output.append(byte)
            else:
                piece = self.pieces[token_id]
                if at_start and self.add_space_prefix and piece.startswith(" "):
                    piece = piece[1:]
                output += piece.encode("utf-8", errors="surrogateescape")
            at_start = token_id in self._prefix_ids
        return output.decode("utf-8", errors="replace")

    # ---- saving ----

    def save(self, directory: Path) -> dict[str, Any]:
        """Write tokenizer.bin in llama2.c's format; the returned metadata keeps what the format cannot."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        encoded = [piece.encode("utf-8", errors="surrogateescape") for piece in self.pieces]
        with open(directory / "tokenizer.bin", "wb") as handle:
            handle.write(struct.pack("<i", max((len(piece) for piece in encoded), default=0)))
            for piece, score in zip(encoded, self.scores, strict=True):
                handle.write(struct.pack("<fi", score, len(piece)))
                handle.write(piece)
        return {
            "kind": "scored_bpe",
            "tokenizer_file": "tokenizer.bin",
            "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids),
            "add_bos": self.add_bos,
            "add_space_prefix": self.add_space_prefix,
            "special_ids": list(self.special_ids),
            "token_types": _compress_token_types(self.token_types),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
        }


def _infer_token_types(pieces: Sequence[str], bos_id: int | None, eos_ids: Sequence[int]) -> list[int]:
    """Guess token types for a vocabulary without them (llama2.c's tokenizer.bin).

    `<0xHH>` pieces are bytes, BOS and EOS are control tokens, "<unk>" is the unknown token, and the
    rest are normal.
    """
    control = {bos_id, *eos_ids}
    types = []
    for token_id, piece in enumerate(pieces):
        if token_id in control:
            types.append(TOKEN_CONTROL)
        elif BYTE_PIECE.fullmatch(piece):
            types.append(TOKEN_BYTE)
        elif piece == "<unk>":
            types.append(TOKEN_UNKNOWN)
        else:
            types.append(TOKEN_NORMAL)
    return types


def _compress_token_types(token_types: Sequence[int]) -> dict[str, list[int]]:
    """Return the ids of each non-normal token type, keyed by the type number as a string."""
    grouped: dict[str, list[int]] = {}
    for token_id, token_type in enumerate(token_types):
        if token_type != TOKEN_NORMAL:
            grouped.setdefault(str(token_type), []).append(token_id)
    return grouped


def _expand_token_types(grouped: Mapping[str, Sequence[int]], size: int) -> list[int]:
    types = [TOKEN_NORMAL] * size
    for token_type, token_ids in grouped.items():
        for token_id in token_ids:
            types[token_id] = int(token_type)
    return types


def _alternation(pieces: Sequence[str]) -> re.Pattern[str] | None:
    """Compile a regex matching any of `pieces`, longest first, so the longest special piece wins."""
    unique = sorted({piece for piece in pieces if piece}, key=len, reverse=True)
    if not unique:
        return None
    return re.compile("|".join(re.escape(piece) for piece in unique))


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file, encoded and decoded by the sentencepiece library."""

    # sentencepiece encodes "<s>" in text as characters, never as the control token.
    parses_special_tokens = False

    def __init__(
        self,
        model_proto: bytes,
        *,
        add_bos: bool = True,
        eos_ids: Sequence[int] | None = None,
        chat_template: str | None = None,
    ) -> None:
        import sentencepiece

        self.model_proto = model_proto
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        bos_id = self.processor.bos_id()
        eos_id = self.processor.eos_id()
        self.bos_id = bos_id if bos_id >= 0 else None
        if eos_ids is None:
            eos_ids = [eos_id] if eos_id >= 0 else []
        self.eos_ids = _unique(eos_ids)
        self.add_bos = add_bos and self.bos_id is not None
        self.chat_template = chat_template
        self.bos_token = self.processor.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.processor.id_to_piece(self.eos_ids[0]) if self.eos_ids else None
        size = self.processor.get_piece_size()
        self._skipped_ids = frozenset(
            i for i in range(size) if self.processor.is_control(i) or self.processor.is_unknown(i)
        )

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> SentencePieceTokenizer:
        """Load a `.model` file; `kwargs` are the constructor's keyword arguments."""
        return cls(Path(path).read_bytes(), **kwargs)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        add_bos = self.add_bos if add_bos is None else add_bos
        return self._with_bos(list(self.processor.encode(text)), add_bos)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids with sentencepiece after dropping control and unknown tokens.

        sentencepiece removes the space prefix of the first piece, which matches llama2.c's text
        for ids generated after BOS.
        """
        size = self.processor.get_piece_size()
        kept = []
        for raw_id in ids:
            token_id = int(raw_id)
            if not 0 <= token_id < size:
                raise ValueError(f"token id {token_id} is outside the vocabulary of {size} pieces")
            if token_id not in self._skipped_ids:
                kept.append(token_id)
        return self.processor.decode(kept)

    def save(self, directory: Path) -> dict[str, Any]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.model").write_bytes(self.model_proto)
        return {
            "kind": "sentencepiece",
            "tokenizer_file": "tokenizer.model",
            "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

SUPPORTED_GGUF_MODELS = ("gpt2", "llama")


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer embedded in GGUF metadata.

    `meta` maps GGUF keys to decoded values (for example
    `{key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}`).
    "gpt2" vocabularies become an `HFTokenizer` (byte-level BPE), "llama" ones a `ScoredBPETokenizer`.
    """
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        return _byte_level_from_gguf(meta)
    if model == "llama":
        return ScoredBPETokenizer.from_gguf(meta)
    raise ValueError(
        f"unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model); supported: "
        f"{list(SUPPORTED_GGUF_MODELS)}. Load the model's HF tokenizer.json instead"
    )


def load_tokenizer(directory: str | Path, meta: Mapping[str, Any]) -> Tokenizer:
    """Restore a tokenizer from the files and the metadata dict its `save` wrote."""
    directory = Path(directory)
    kind = meta.get("kind")
    if kind == "hf":
        return HFTokenizer.from_file(
            directory / meta.get("tokenizer_file", "tokenizer.json"),
            bos_token=meta.get("bos_token"),
            eos_token=meta.get("eos_token"),
            eos_ids=meta.get("eos_ids"),
            chat_template=meta.get("chat_template"),
        )
    if kind == "scored_bpe":
        saved = ScoredBPETokenizer.from_llama2c_file(directory / meta.get("tokenizer_file", "tokenizer.bin"))
        return ScoredBPETokenizer(
            saved.pieces,
            saved.scores,
            token_types=_expand_token_types(meta.get("token_types", {}), len(saved.pieces)),
            bos_id=meta.get("bos_id"),
            eos_ids=meta.get("eos_ids", ()),
            add_bos=bool(meta.get("add_bos", True)),
            add_space_prefix=bool(meta.get("add_space_prefix", True)),
            special_ids=meta.get("special_ids", ()),
            chat_template=meta.get("chat_template"),
            bos_token=meta.get("bos_token"),
            eos_token=meta.get("eos_token"),
        )
    if kind == "sentencepiece":
        return SentencePieceTokenizer.from_file(
            directory / meta.get("tokenizer_file", "tokenizer.model"),
            add_bos=bool(meta.get("add_bos", True)),
            eos_ids=meta.get("eos_ids"),
            chat_template=meta.get("chat_template"),
        )
    raise ValueError(
        f"unknown tokenizer kind {kind!r} in the checkpoint metadata; expected 'hf', "
        "'scored_bpe' or 'sentencepiece' (as written by Tokenizer.save)"
    )


def tokenizer_from_path(path: str | Path) -> Tokenizer:
    """Open a tokenizer file or directory.

    Accepts an HF directory or its tokenizer.json, another tokenizer.json-format file, a directory
    with only tokenizer.model, a SentencePiece `.model` file, a llama2.c `.bin` file or a `.gguf`
    file.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return HFTokenizer.from_directory(path)
        if (path / "tokenizer.model").exists():
            return SentencePieceTokenizer.from_file(path / "tokenizer.model")
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in directory {path}")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} not found")
    suffix = path.suffix.lower()
    if path.name == "tokenizer.json":
        return HFTokenizer.from_directory(path.parent)
    if suffix == ".json":
        return HFTokenizer.from_file(path)
    if suffix == ".model":
        return SentencePieceTokenizer.from_file(path)
    if suffix == ".bin":
        return ScoredBPETokenizer.from_llama2c_file(path)
    if suffix == ".gguf":
        from jaxinfer.convert.gguf import gguf_metadata, open_gguf

        return tokenizer_from_gguf(gguf_metadata(open_gguf(path), path))
    raise ValueError(
        f"cannot tell the tokenizer format of {path}; expected an HF directory, tokenizer.json, "
        "a SentencePiece .model, a llama2.c .bin or a .gguf file"
    )
