"""Incremental detokenization equals decoding the whole sequence, and never splits a character."""
import pytest

from pdserve.engine.loader import default_model_dir
from pdserve.engine.tokenizer import IncrementalDetokenizer, ids_decoder, load_tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "naïve café — 東京タワー 🚀🎉 and ünïcödé, then   spaces\n\nnewlines",
    "def f(x):\n    return x ** 2  # ✓",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_dir())


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([token]) for token in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)


def test_byte_level_pieces_wait_for_the_whole_character(tokenizer):
    ids = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1, "the emoji spans several byte tokens in this tokenizer"
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🚀"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("clean_up", [False, True])
def test_the_fast_decoder_equals_the_tokenizers_decode(tokenizer, skip_special_tokens, clean_up, monkeypatch):
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", clean_up)
    decode = ids_decoder(tokenizer, skip_special_tokens)
    special = tokenizer.all_special_ids[:2]
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for window in (ids, ids[3:9], special + ids[:5] + special, ids[:1], []):
            assert decode(window) == tokenizer.decode(window, skip_special_tokens=skip_special_tokens)
