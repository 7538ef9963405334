"""Tokenizer tests against real components.

The references are llama2.c's stories260K tokenizer with its published greedy output, and the
sentencepiece library on the same vocabulary. For byte-level BPE they are HF transformers'
AutoTokenizer on the SmolLM2 GGUF and on the directories it saves, small GGUF files written here
with the Llama 3 pre-tokenizer, and transformers' Qwen2Tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jinja2
import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from jaxinfer.convert.gguf import gguf_metadata, open_gguf
from jaxinfer.tokenizer import (
    HFTokenizer,
    ScoredBPETokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenizer_from_gguf,
    tokenizer_from_path,
)

transformers = pytest.importorskip("transformers")

# Strings for the stories260K vocabulary: single spaces only, because sentencepiece collapses
# repeated whitespace for tok512.model (remove_extra_whitespaces) and llama2.c does not.
STORY_STRINGS = [
    "Once upon a time",
    "Hello world!",
    "Lily's mom said, \"Don't worry.\"",
    "One day,\nshe saw a big, red ball.",
    "émoji 😀 ok",
    "123 4567 89",
    "x",
    "",
    "日本語",
]

WHITESPACE_STRINGS = ["a  b", "  lead", "trail ", "   ", "\t x \n", "a \n  b"]

# Strings for the byte-level vocabularies (SmolLM2's).
TEXT_STRINGS = [
    "Hello, world!",
    "  multiple   spaces\tand\n\nnewlines  ",
    "12345 67.89 1e10 3,000,000",
    "naïve café — “quotes” 日本語 😀👍🏽",
    "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "don't I'll WE'RE",
    "",
    " ",
    "e\u0301 decomposed",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
]

# Vocabulary size of the reduced SmolLM2 vocabularies. In SmolLM2's GGUF, token 252 + i is the
# result of merge i, so the first N tokens and the first N - 252 merges form a complete BPE.
SMALL_VOCAB = 4000
FIRST_MERGED_TOKEN = 252


# ---- fixtures ----


@pytest.fixture(scope="module")
def reference_ids(stories260k_dir: Path) -> list[int]:
    return [int(token) for token in (stories260k_dir / "greedy_from_bos_256.ids").read_text().split()]


@pytest.fixture(scope="module")
def reference_text(stories260k_dir: Path) -> str:
    return (stories260k_dir / "greedy_from_bos_256.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bin_tokenizer(stories260k_dir: Path) -> ScoredBPETokenizer:
    return ScoredBPETokenizer.from_llama2c_file(stories260k_dir / "tok512.bin")


@pytest.fixture(scope="module")
def model_tokenizer(stories260k_dir: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_file(stories260k_dir / "tok512.model")


@pytest.fixture(scope="module")
def whitespace_keeping_processor(stories260k_dir: Path) -> sentencepiece.SentencePieceProcessor:
    """tok512.model with remove_extra_whitespaces off, so sentencepiece keeps every space as llama2.c does."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((stories260k_dir / "tok512.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = False
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


def write_gguf(path: Path, metadata: dict) -> Path:
    """Write a GGUF file with tokenizer metadata and no tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in metadata:
        writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in metadata:
        writer.add_token_scores(metadata["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in metadata:
        writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.add_bos_token" in metadata:
        writer.add_add_bos_token(metadata["tokenizer.ggml.add_bos_token"])
    if "tokenizer.chat_template" in metadata:
        writer.add_chat_template(metadata["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tok512_gguf(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tok512.model's vocabulary written as a GGUF SentencePiece ("llama") tokenizer."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(stories260k_dir / "tok512.model"))
    size = processor.get_piece_size()
    token_types = []
    for i in range(size):
        if processor.is_unknown(i):
            token_types.append(gguf.TokenType.UNKNOWN)
        elif processor.is_control(i):
            token_types.append(gguf.TokenType.CONTROL)
        elif processor.is_byte(i):
            token_types.append(gguf.TokenType.BYTE)
        else:
            token_types.append(gguf.TokenType.NORMAL)
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in range(size)],
        "tokenizer.ggml.scores": [processor.get_score(i) for i in range(size)],
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.bos_token_id": processor.bos_id(),
        "tokenizer.ggml.eos_token_id": processor.eos_id(),
    }
    return write_gguf(tmp_path_factory.mktemp("tok512_gguf") / "tok512.gguf", metadata)


@pytest.fixture(scope="module")
def smollm_meta(smollm2_gguf: Path) -> dict:
    return gguf_metadata(open_gguf(smollm2_gguf), smollm2_gguf)


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_meta: dict) -> HFTokenizer:
    return tokenizer_from_gguf(smollm_meta)


@pytest.fixture(scope="module")
def smollm_reference(smollm2_gguf: Path):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def smollm_hf_dir(smollm_reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("smollm_hf")
    smollm_reference.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def small_meta(smollm_meta: dict) -> dict:
    """SmolLM2's vocabulary cut to its first SMALL_VOCAB tokens, to keep reference loads fast."""
    meta = dict(smollm_meta)
    meta["tokenizer.ggml.tokens"] = smollm_meta["tokenizer.ggml.tokens"][:SMALL_VOCAB]
    meta["tokenizer.ggml.token_type"] = smollm_meta["tokenizer.ggml.token_type"][:SMALL_VOCAB]
    meta["tokenizer.ggml.merges"] = smollm_meta["tokenizer.ggml.merges"][:SMALL_VOCAB - FIRST_MERGED_TOKEN]
    return meta


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_meta(small_meta: dict) -> dict:
    """A Llama 3 style GGUF tokenizer: "llama-bpe" split, BOS added, a template that writes BOS."""
    meta = dict(small_meta)
    meta["tokenizer.ggml.pre"] = "llama-bpe"
    meta["tokenizer.ggml.bos_token_id"] = 0
    meta["tokenizer.ggml.add_bos_token"] = True
    meta["tokenizer.chat_template"] = LLAMA3_TEMPLATE
    return meta


@pytest.fixture(scope="module")
def llama3_gguf(llama3_meta: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("llama3_gguf") / "llama3.gguf", llama3_meta)


@pytest.fixture(scope="module")
def llama3_reference(llama3_gguf: Path):
    return transformers.AutoTokenizer.from_pretrained(str(llama3_gguf.parent), gguf_file=llama3_gguf.name)


@pytest.fixture(scope="module")
def llama3_hf_dir(llama3_reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF directory whose tokenizer.json post-processor adds BOS, with EOS ids in the model configs."""
    directory = tmp_path_factory.mktemp("llama3_hf")
    llama3_reference.save_pretrained(str(directory))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 7, "bos_token_id": 0}))
    return directory


@pytest.fixture(scope="module")
def qwen2_reference(small_meta: dict):
    """transformers' Qwen2Tokenizer (NFC, digit-by-digit split) over the reduced vocabulary."""
    tokens = small_meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in small_meta["tokenizer.ggml.merges"]]
    tokenizer = transformers.Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def qwen2_hf_dir(qwen2_reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("qwen2_hf")
    qwen2_reference.save_pretrained(str(directory))
    return directory


def reference_encode_chat(reference, messages: list[dict]) -> list[int]:
    encoded = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(encoded["input_ids"] if "input_ids" in encoded else encoded)


# ---- llama2.c tokenizer.bin ----


def test_llama2c_decode_reference_text(bin_tokenizer, reference_ids, reference_text):
    assert bin_tokenizer.decode(reference_ids) == reference_text


def test_llama2c_decode_after_bos(bin_tokenizer, reference_ids, reference_text):
    assert bin_tokenizer.decode([bin_tokenizer.bos_id, *reference_ids]) == reference_text


def test_llama2c_encode_reference_text(bin_tokenizer, reference_text):
    # Greedy output need not be the canonical encoding, so this checks the text round trip.
    assert bin_tokenizer.decode(bin_tokenizer.encode(reference_text)) == reference_text


@pytest.mark.parametrize("text", STORY_STRINGS)
def test_llama2c_encode_matches_sentencepiece(bin_tokenizer, model_tokenizer, text):
    assert bin_tokenizer.encode(text) == model_tokenizer.encode(text)


@pytest.mark.parametrize("text", WHITESPACE_STRINGS)
def test_llama2c_encode_keeps_whitespace(bin_tokenizer, whitespace_keeping_processor, text):
    # llama2.c keeps every space, and sentencepiece agrees once remove_extra_whitespaces is off.
    assert bin_tokenizer.encode(text, add_bos=False) == whitespace_keeping_processor.encode(text)


def test_sentencepiece_collapses_whitespace(bin_tokenizer, model_tokenizer):
    # The only difference found (here and on 3,000 random strings of story words): tok512.model sets
    # remove_extra_whitespaces, which llama2.c ignores.
    assert bin_tokenizer.encode("a  b") != model_tokenizer.encode("a  b")


@pytest.mark.parametrize("text", STORY_STRINGS + WHITESPACE_STRINGS)
def test_llama2c_round_trip(bin_tokenizer, text):
    assert bin_tokenizer.decode(bin_tokenizer.encode(text)) == text


def test_llama2c_encode_empty_is_bos(bin_tokenizer):
    assert bin_tokenizer.encode("") == [1]


def test_llama2c_encode_without_bos(bin_tokenizer):
    assert bin_tokenizer.encode("x", add_bos=False) == bin_tokenizer.encode("x")[1:]


def test_llama2c_byte_fallback(bin_tokenizer):
    # U+1F600 is not a piece, so it becomes its four UTF-8 bytes as pieces <0xF0>... (id = byte + 3).
    ids = bin_tokenizer.encode("😀", add_bos=False)
    assert ids[1:] == [byte + 3 for byte in "😀".encode()]


def test_llama2c_special_ids(bin_tokenizer):
    assert (bin_tokenizer.bos_id, bin_tokenizer.eos_ids) == (1, (2, 1))


def test_llama2c_decode_skips_control(bin_tokenizer):
    assert bin_tokenizer.decode([1, 403, 2, 0]) == "Once"


def test_llama2c_decode_rejects_bad_id(bin_tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bin_tokenizer.decode([512])


def test_llama2c_save_writes_same_file(bin_tokenizer, stories260k_dir, tmp_path):
    bin_tokenizer.save(tmp_path)
    assert (tmp_path / "tokenizer.bin").read_bytes() == (stories260k_dir / "tok512.bin").read_bytes()


# ---- SentencePiece .model ----


def test_sentencepiece_decode_reference_text(model_tokenizer, reference_ids, reference_text):
    assert model_tokenizer.decode(reference_ids) == reference_text


def test_sentencepiece_decode_after_bos(model_tokenizer, reference_ids, reference_text):
    assert model_tokenizer.decode([1, *reference_ids]) == reference_text


def test_sentencepiece_special_ids(model_tokenizer):
    assert (model_tokenizer.bos_id, model_tokenizer.eos_ids, model_tokenizer.add_bos) == (1, (2,), True)


# ---- GGUF SentencePiece ("llama") ----


@pytest.fixture(scope="module")
def tok512_gguf_tokenizer(tok512_gguf: Path) -> ScoredBPETokenizer:
    return tokenizer_from_path(tok512_gguf)


@pytest.fixture(scope="module")
def tok512_gguf_reference(tok512_gguf: Path):
    return transformers.AutoTokenizer.from_pretrained(str(tok512_gguf.parent), gguf_file=tok512_gguf.name)


def test_gguf_llama_kind(tok512_gguf_tokenizer):
    assert isinstance(tok512_gguf_tokenizer, ScoredBPETokenizer)


@pytest.mark.parametrize("text", STORY_STRINGS + WHITESPACE_STRINGS)
def test_gguf_llama_matches_llama2c(tok512_gguf_tokenizer, bin_tokenizer, text):
    assert tok512_gguf_tokenizer.encode(text) == bin_tokenizer.encode(text)


# Leading whitespace and text after special tokens are left out. transformers' Metaspace adds
# the space prefix only at the start of text that does not start with a space. llama.cpp (and
# sentencepiece, per fragment) adds it at the start and after every special token.
@pytest.mark.parametrize("text", STORY_STRINGS + ["a  b", "trail ", "x<s>", "x</s>"])
def test_gguf_llama_matches_transformers(tok512_gguf_tokenizer, tok512_gguf_reference, text):
    assert tok512_gguf_tokenizer.encode(text) == tok512_gguf_reference.encode(text)


def test_gguf_llama_parses_control(tok512_gguf_tokenizer):
    assert tok512_gguf_tokenizer.encode("x</s>", add_bos=False)[-1] == 2


def test_gguf_llama_prefix_after_special(tok512_gguf_tokenizer, whitespace_keeping_processor):
    # Meta's Llama 2 chat code encodes each turn separately, each with the space prefix.
    first, second = "[INST] hi [/INST] ok ", "[INST] next"
    expected = [1, *whitespace_keeping_processor.encode(first), 2, 1,
                *whitespace_keeping_processor.encode(second)]
    text = f"<s>{first}</s><s>{second}"
    assert tok512_gguf_tokenizer.encode(text, add_bos=False) == expected


def test_gguf_llama_decode_after_special(tok512_gguf_tokenizer):
    text = "<s>Hi</s><s>there"
    assert tok512_gguf_tokenizer.decode(tok512_gguf_tokenizer.encode(text)) == "Hithere"


def test_gguf_llama_decode_reference_text(tok512_gguf_tokenizer, reference_ids, reference_text):
    assert tok512_gguf_tokenizer.decode(reference_ids) == reference_text


# ---- GGUF byte-level BPE ("gpt2"): SmolLM2 ----


@pytest.mark.parametrize("text", TEXT_STRINGS)
def test_smollm_encode_matches_transformers(smollm_tokenizer, smollm_reference, text):
    assert smollm_tokenizer.encode(text) == smollm_reference.encode(text)


@pytest.mark.parametrize("text", [text for text in TEXT_STRINGS if "<|" not in text])
def test_smollm_round_trip(smollm_tokenizer, text):
    assert smollm_tokenizer.decode(smollm_tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TEXT_STRINGS)
def test_smollm_decode_matches_transformers(smollm_tokenizer, smollm_reference, text):
    ids = smollm_reference.encode(text)
    assert smollm_tokenizer.decode(ids) == smollm_reference.decode(ids, skip_special_tokens=True)


def test_smollm_special_tokens(smollm_tokenizer):
    assert (smollm_tokenizer.bos_id, smollm_tokenizer.eos_ids, smollm_tokenizer.add_bos) == (1, (2,), False)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_smollm_chat_template(smollm_tokenizer, smollm_reference, conversation, generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = smollm_reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected


def test_smollm_encode_chat(smollm_tokenizer, smollm_reference):
    messages = CONVERSATIONS[1]
    assert smollm_tokenizer.encode_chat(messages) == reference_encode_chat(smollm_reference, messages)


# ---- HF directories ----


@pytest.fixture(scope="module")
def smollm_dir_tokenizer(smollm_hf_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_directory(smollm_hf_dir)


@pytest.fixture(scope="module")
def smollm_dir_reference(smollm_hf_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(smollm_hf_dir))


@pytest.mark.parametrize("text", TEXT_STRINGS)
def test_hf_dir_matches_transformers(smollm_dir_tokenizer, smollm_dir_reference, text):
    assert smollm_dir_tokenizer.encode(text) == smollm_dir_reference.encode(text)


def test_hf_dir_reads_template_file(smollm_hf_dir, smollm_dir_tokenizer, smollm_tokenizer):
    assert (smollm_hf_dir / "chat_template.jinja").exists()
    assert smollm_dir_tokenizer.chat_template == smollm_tokenizer.chat_template


def test_hf_dir_special_tokens(smollm_dir_tokenizer):
    tokenizer = smollm_dir_tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.add_bos) == (1, (2,), False)


def test_hf_path_of_tokenizer_json(smollm_hf_dir):
    assert tokenizer_from_path(smollm_hf_dir / "tokenizer.json").eos_ids == (2,)


# ---- Llama 3 style ----


@pytest.fixture(scope="module")
def llama3_tokenizer(llama3_meta: dict) -> HFTokenizer:
    return tokenizer_from_gguf(llama3_meta)


@pytest.fixture(scope="module")
def llama3_dir_tokenizer(llama3_hf_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_directory(llama3_hf_dir)


@pytest.fixture(scope="module")
def llama3_dir_reference(llama3_hf_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(llama3_hf_dir))


@pytest.mark.parametrize("text", TEXT_STRINGS)
def test_llama3_gguf_matches_transformers(llama3_tokenizer, llama3_reference, text):
    assert llama3_tokenizer.encode(text) == llama3_reference.encode(text)


def test_llama3_gguf_adds_bos(llama3_tokenizer):
    assert llama3_tokenizer.encode("hi")[0] == 0


def test_llama3_gguf_path(llama3_gguf):
    assert tokenizer_from_path(llama3_gguf).add_bos is True


@pytest.mark.parametrize("text", TEXT_STRINGS)
def test_llama3_dir_matches_transformers(llama3_dir_tokenizer, llama3_dir_reference, text):
    assert llama3_dir_tokenizer.encode(text) == llama3_dir_reference.encode(text)


def test_llama3_dir_add_bos(llama3_dir_tokenizer):
    assert llama3_dir_tokenizer.add_bos is True


def test_llama3_dir_eos_ids(llama3_dir_tokenizer):
    # generation_config.json first, then config.json, then the tokenizer's EOS token.
    assert llama3_dir_tokenizer.eos_ids == (2, 5, 7)


def test_llama3_dir_explicit_no_bos(llama3_dir_tokenizer):
    assert llama3_dir_tokenizer.encode("hi", add_bos=False) == llama3_dir_tokenizer.encode("hi")[1:]


def test_llama3_encode_chat_single_bos(llama3_tokenizer, llama3_reference):
    messages = CONVERSATIONS[0]
    assert llama3_tokenizer.encode_chat(messages) == reference_encode_chat(llama3_reference, messages)


def test_llama3_encode_chat_bos_count(llama3_tokenizer):
    assert llama3_tokenizer.encode_chat(CONVERSATIONS[0]).count(0) == 1


# ---- Qwen2 style ----


@pytest.fixture(scope="module")
def qwen2_tokenizer(small_meta: dict) -> HFTokenizer:
    return tokenizer_from_gguf(dict(small_meta, **{"tokenizer.ggml.pre": "qwen2"}))


@pytest.fixture(scope="module")
def qwen2_dir_tokenizer(qwen2_hf_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_directory(qwen2_hf_dir)


@pytest.fixture(scope="module")
def qwen2_dir_reference(qwen2_hf_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(qwen2_hf_dir))


@pytest.mark.parametrize("text", TEXT_STRINGS)
def test_qwen2_dir_matches_transformers(qwen2_dir_tokenizer, qwen2_dir_reference, text):
    assert qwen2_dir_tokenizer.encode(text) == qwen2_dir_reference.encode(text)


@pytest.mark.parametrize("text", TEXT_STRINGS)
def test_qwen2_gguf_matches_transformers(qwen2_tokenizer, qwen2_reference, text):
    assert qwen2_tokenizer.encode(text) == qwen2_reference.encode(text)


def test_qwen2_gguf_normalizes_nfc(qwen2_tokenizer):
    assert qwen2_tokenizer.encode("e\u0301") == qwen2_tokenizer.encode("\u00e9")


def test_qwen2_dir_special_tokens(qwen2_dir_tokenizer):
    tokenizer = qwen2_dir_tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.add_bos) == (None, (2,), False)


# ---- chat templates ----


TEMPLATE_FEATURES = (
    "{% for message in messages %}\n"
    "  {% if message['role'] == 'stop' %}{% break %}{% endif %}\n"
    "  {{ message['role'] }}: {{ message['content'] | tojson }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "  {{- eos_token }} go\n"
    "{% endif %}"
)


def test_template_features_match_transformers(smollm_tokenizer, smollm_reference):
    # trim_blocks, lstrip_blocks, loop controls and the non-escaping tojson filter.
    messages = [{"role": "user", "content": "<b>&'x'</b> é"}, {"role": "stop", "content": ""},
                {"role": "user", "content": "never"}]
    smollm_tokenizer.chat_template, original = TEMPLATE_FEATURES, smollm_tokenizer.chat_template
    try:
        ours = smollm_tokenizer.apply_chat_template(messages)
    finally:
        smollm_tokenizer.chat_template = original
    expected = smollm_reference.apply_chat_template(
        messages, chat_template=TEMPLATE_FEATURES, tokenize=False, add_generation_prompt=True
    )
    assert ours == expected


def test_template_raise_exception(bin_tokenizer):
    bin_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    try:
        with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
            bin_tokenizer.apply_chat_template(CONVERSATIONS[0])
    finally:
        bin_tokenizer.chat_template = None


def test_template_sandbox_blocks_mutation(bin_tokenizer):
    bin_tokenizer.chat_template = "{{ messages.append(1) }}"
    try:
        with pytest.raises(jinja2.exceptions.SecurityError):
            bin_tokenizer.apply_chat_template(CONVERSATIONS[0])
    finally:
        bin_tokenizer.chat_template = None


def test_encode_chat_bos_text_sentencepiece(stories260k_dir):
    # sentencepiece cannot parse "<s>" in text, so the template's BOS text becomes the BOS id.
    tokenizer = SentencePieceTokenizer.from_file(
        stories260k_dir / "tok512.model", chat_template="{{ bos_token }}{{ messages[0]['content'] }}"
    )
    assert tokenizer.encode_chat([{"role": "user", "content": "Once upon"}]) == tokenizer.encode("Once upon")


def test_encode_chat_bos_text_gguf_llama(tok512_gguf_tokenizer):
    tok512_gguf_tokenizer.chat_template = "{{ bos_token }}{{ messages[0]['content'] }}"
    try:
        ids = tok512_gguf_tokenizer.encode_chat([{"role": "user", "content": "Once upon"}])
    finally:
        tok512_gguf_tokenizer.chat_template = None
    assert ids == tok512_gguf_tokenizer.encode("Once upon")


def test_template_missing_raises(bin_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        bin_tokenizer.apply_chat_template(CONVERSATIONS[0])


# ---- save and load ----


def round_trip(tokenizer, directory: Path):
    meta = tokenizer.save(directory)
    json.dumps(meta)  # the metadata must be storable as JSON
    return load_tokenizer(directory, meta)


@pytest.mark.parametrize("text", TEXT_STRINGS)
def test_save_load_hf(smollm_tokenizer, tmp_path, text):
    restored = round_trip(smollm_tokenizer, tmp_path)
    assert restored.encode(text) == smollm_tokenizer.encode(text)


def test_save_load_hf_attributes(llama3_tokenizer, tmp_path):
    tokenizer = llama3_tokenizer
    restored = round_trip(tokenizer, tmp_path)
    expected = (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.add_bos, tokenizer.chat_template)
    assert (restored.bos_id, restored.eos_ids, restored.add_bos, restored.chat_template) == expected


@pytest.mark.parametrize("text", STORY_STRINGS + WHITESPACE_STRINGS)
def test_save_load_llama2c(bin_tokenizer, tmp_path, text):
    assert round_trip(bin_tokenizer, tmp_path).encode(text) == bin_tokenizer.encode(text)


def test_save_load_llama2c_attributes(bin_tokenizer, tmp_path):
    restored = round_trip(bin_tokenizer, tmp_path)
    expected = (bin_tokenizer.bos_id, bin_tokenizer.eos_ids, bin_tokenizer.add_bos)
    assert (restored.bos_id, restored.eos_ids, restored.add_bos) == expected


@pytest.mark.parametrize("text", ["<s>Hi</s> there", "a  b", "émoji 😀 ok"])
def test_save_load_gguf_llama(tok512_gguf_tokenizer, tmp_path, text):
    assert round_trip(tok512_gguf_tokenizer, tmp_path).encode(text) == tok512_gguf_tokenizer.encode(text)


def test_save_load_gguf_llama_decode(tok512_gguf_tokenizer, reference_ids, reference_text, tmp_path):
    assert round_trip(tok512_gguf_tokenizer, tmp_path).decode(reference_ids) == reference_text


@pytest.mark.parametrize("text", STORY_STRINGS)
def test_save_load_sentencepiece(model_tokenizer, tmp_path, text):
    assert round_trip(model_tokenizer, tmp_path).encode(text) == model_tokenizer.encode(text)


def test_load_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path, {"kind": "tiktoken"})


# ---- dispatch and errors ----


def test_path_bin_is_llama2c(stories260k_dir):
    assert isinstance(tokenizer_from_path(stories260k_dir / "tok512.bin"), ScoredBPETokenizer)


def test_path_model_is_sentencepiece(stories260k_dir):
    assert isinstance(tokenizer_from_path(stories260k_dir / "tok512.model"), SentencePieceTokenizer)


def test_path_directory_is_hf(smollm_hf_dir):
    assert isinstance(tokenizer_from_path(smollm_hf_dir), HFTokenizer)


def test_path_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        tokenizer_from_path(tmp_path / "absent.model")


def test_gguf_unknown_model():
    with pytest.raises(ValueError, match="supported"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "t5"})


def test_gguf_unknown_pre(small_meta):
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer"):
        tokenizer_from_gguf(dict(small_meta, **{"tokenizer.ggml.pre": "falcon"}))
