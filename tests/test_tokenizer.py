"""qwenlab.tokenizer against transformers, with the real Qwen3 tokenizer files."""

from __future__ import annotations

import random
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.tokenizer_fixtures import make_checkpoint, ours, reference, reference_fast

from qwenlab.errors import CheckpointError, ConfigError, QwenlabError, RequestError
from qwenlab.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see—won't we?",
    "chinese": "通义千问是阿里云研发的大语言模型，支持中文、英文等多种语言。",
    "japanese": "日本語のテキスト：ひらがな、カタカナ、漢字を含む文章です。ｶﾀｶﾅ半角",
    "korean": "안녕하세요, 세계! 한국어 문장을 토큰화합니다.",
    "arabic": "مرحبا بالعالم، هذا نص عربي مع أرقام ١٢٣ و 456.",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "hindi": "नमस्ते दुनिया! यह हिन्दी में एक वाक्य है।",
    "code": 'def f(x: int) -> int:\n    """Doc."""\n    return {"a": [x ** 2 for _ in range(10)]}\n\tif x != 0 && y:\n',
    "emoji_zwj": "Family: 👨‍👩‍👧‍👦, flags 🇯🇵🇺🇸, skin 👍🏽, heart ❤️‍🔥, keycap 1️⃣ and 🧑‍💻.",
    "digits": "3.14159265358979 1234567890 ٠١٢ 0x1F 1e-10 12,345,678.90",
    "whitespace_runs": "a  b   c    d\t\t\te \n\n\n f     \n   \n\t g" + " " * 17 + "end   ",
    "crlf": "line one\r\nline two\r\n\r\nline four\rcarriage\n",
    "inline_special": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhm\n</think>\n\n"
                      "<tool_call>\n{}\n</tool_call><|endoftext|><|fim_prefix|>x<|vision_pad|>",
    "nfc_changes": "e\u0301 A\u030a \u1100\u1161\u11a8 \u2126 \ufb01 n\u0303o\u0308 \u0958",
    "contractions": "I'M you'RE they'Ve she'd we'll it'S DON'T",
    "mixed_scripts": "Qwen3 模型 supports 119 languages — ελληνικά, עברית, ไทย, tiếng Việt.",
    "empty": "",
    "only_space": "   ",
    "specials_adjacent": "<|im_end|><|im_end|>a<think></think>",
    "partial_specials": "<|im_end <think <|im_start|",
    "control_chars": "\x00\x01\x1b[31mred\x1b[0m\x7f\u200b\u200d\ufeff",
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return ours()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_ids_identical_to_transformers(tok, name):
    text = CORPUS[name]
    ids = tok.encode(text)
    assert ids == reference().encode(text, add_special_tokens=False)
    assert ids == reference_fast().encode(text, add_special_tokens=False)


def test_encode_batch_matches_encode(tok):
    texts = list(CORPUS.values())
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == reference()(texts, add_special_tokens=False)["input_ids"]


def test_nfc_normalisation_applies_before_bpe(tok):
    decomposed = CORPUS["nfc_changes"]
    assert decomposed != unicodedata.normalize("NFC", decomposed)
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed))


def test_digits_split_one_per_token(tok):
    assert [tok.decode([i]) for i in tok.encode("2025")] == ["2", "0", "2", "5"]


def test_inline_special_tokens_become_their_ids(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><think><tool_call>")
    assert ids[0] == 151644 and ids[-3:] == [151645, 151667, 151657]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_decode_identical_to_transformers(tok, name, skip):
    ids = tok.encode(CORPUS[name])
    assert tok.decode(ids, skip_special_tokens=skip) == reference().decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [False, True])
def test_decode_random_ids_identical_to_transformers(tok, skip):
    # Random ids cut characters in half and mix special and added tokens between byte runs.
    rng = random.Random(0)
    special = list(range(151643, 151669))
    for _ in range(200):
        ids = [rng.choice(special) if rng.random() < 0.15 else rng.randrange(151643) for _ in range(rng.randrange(1, 40))]
        assert tok.decode(ids, skip_special_tokens=skip) == reference().decode(ids, skip_special_tokens=skip)


def test_decode_roundtrip(tok):
    for text in CORPUS.values():
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_skip_special_tokens_keeps_think_and_tool_call(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call>"


def test_special_and_added_tokens_have_qwen_semantics(tok):
    assert tok.vocab_size == len(tok) == len(reference()) == 151669
    assert tok.special_ids == frozenset(range(151643, 151657))  # ChatML, endoftext and vision tokens
    assert set(tok.special_tokens) == set(reference().all_special_tokens)
    assert tok.added_tokens["<think>"] == 151667 and tok.added_tokens["</tool_response>"] == 151666
    assert not tok.is_special(151667) and not tok.is_special(151657) and tok.is_special(151645)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token_id == 151643 and tok.bos_token_id is None
    assert tok.encode("hello") == [14990]  # no BOS, no EOS


def test_tokens_and_bytes(tok):
    ids = tok.encode(" héllo")
    assert tok.convert_ids_to_tokens(ids) == reference().convert_ids_to_tokens(ids)
    assert b"".join(tok.token_bytes(i) for i in ids) == " héllo".encode()
    assert tok.token_bytes(151667) == b"<think>" and tok.token_bytes(10**7) == b""


def test_eos_ids_from_generation_config(tok):
    assert tok.eos_token_ids == (151645, 151643)  # read from the checkpoint's generation_config.json
    assert tok.generation_config["top_k"] == 20

    def eos_ids(generation: dict, eos_token: str = "<|im_end|>") -> tuple[int, ...]:
        return Tokenizer(tok.backend, tokenizer_config={"eos_token": eos_token},
                         generation_config=generation).eos_token_ids

    assert eos_ids({"eos_token_id": 151643}, "<|endoftext|>") == (151643,)  # a base model
    assert eos_ids({}) == (151645, 151643)  # a chat checkpoint without generation_config.json stops on both
    assert eos_ids({"eos_token_id": [151643]}) == (151643, 151645)  # generation_config's first, then the tokenizer's
    assert eos_ids({}, eos_token={"content": "<|endoftext|>", "special": True}) == (151643,)  # AddedToken form


def test_decode_skips_unknown_ids_and_rejects_negative(tok):
    assert tok.decode([14990, 151900, 151669]) == "hello"  # embedding padding rows carry no text
    with pytest.raises(RequestError):
        tok.decode([14990, -1])
    with pytest.raises(RequestError):
        tok.encode(123)  # type: ignore[arg-type]
    with pytest.raises(RequestError):
        tok.encode_batch("not a list")  # type: ignore[arg-type]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        Tokenizer.from_pretrained(tmp_path)
    broken = make_checkpoint(tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(broken)


def test_non_byte_level_tokenizer_is_refused():
    import tokenizers

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.decoder = tokenizers.decoders.Fuse()
    with pytest.raises(ConfigError, match="byte-level"):
        Tokenizer(backend, name_or_path="wordpiece-like")


# ---- streaming detokenizer -------------------------------------------------------------------------
def stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    return deltas + [detok.finish()]


def check_stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> None:
    deltas = stream(tok, ids, skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    emitted = ""
    for delta in deltas:  # every prefix of the stream is a prefix of the final text
        emitted += delta
        assert full.startswith(emitted)
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
PIECES = [*"aé中文日本語한국어ع🎉👨‍👩‍👧🇯🇵\u200d\ufe0f \n\r\t1<|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
          "<|endoftext|>"]
scripts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts | scripts, skip=st.booleans())
def test_incremental_detokenizer_on_random_text(tok, text, skip):
    check_stream(tok, tok.encode(text), skip)


# Any id; the 256 single-byte tokens (which split characters); the added tokens; ids past the vocabulary.
any_id = st.integers(0, 151700) | st.integers(0, 255) | st.integers(151643, 151668) | st.integers(151669, 152063)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=st.lists(any_id, max_size=30), skip=st.booleans())
def test_incremental_detokenizer_on_random_ids(tok, ids, skip):
    # Arbitrary ids leave characters incomplete or invalid: U+FFFD must land exactly where decode puts it.
    check_stream(tok, ids, skip)


def test_incremental_detokenizer_holds_split_characters(tok):
    first, second = tok.token_to_id("ðŁĺ"), tok.token_to_id("Ģ")  # the two halves of U+1F600
    detok = tok.incremental_detokenizer()
    assert detok.add(first) == "" and detok.add(second) == "😀"
    assert detok.finish() == "" and detok.text == "😀" and detok.ids == [first, second]
    # An added token ends the byte run: the lone half is a replacement character, as in decode.
    assert "".join(stream(tok, [first, 151667, second])) == tok.decode([first, 151667, second]) == "\ufffd<think>\ufffd"
    # A special token skipped does not end the byte run.
    assert "".join(stream(tok, [first, 151645, second], skip=True)) == "😀"


def test_incremental_detokenizer_rejects_bad_ids(tok):
    with pytest.raises(RequestError):
        tok.incremental_detokenizer().add(-5)
    detok = tok.incremental_detokenizer()
    assert detok.add(2**40) == "" and detok.add(14990) == "hello"  # unknown ids carry no text, as in decode


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_incremental_detokenizer_on_corpus(tok, name):
    check_stream(tok, tok.encode(CORPUS[name]))
    check_stream(tok, tok.encode(CORPUS[name]), skip=True)


def test_errors_are_qwenlab_errors():
    from qwenlab.tokenizer import ChatTemplateError, ChatTemplateRenderError

    assert issubclass(ChatTemplateError, ConfigError) and issubclass(ChatTemplateRenderError, RequestError)
    assert issubclass(ChatTemplateRenderError, QwenlabError)


def test_exported_from_the_package():
    import qwenlab

    assert qwenlab.Tokenizer is Tokenizer
