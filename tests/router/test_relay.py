"""Stop strings in the relayed text, and vLLM's min_tokens: a stop string ends nothing in the text of
the tokens before the min_tokens-th, however the tokens arrive (one a message or several)."""
import pytest

from pdserve.router.relay import TextRelay

from router_fakes import ids, make_tokenizer

TOKENS = ids("the quick fox jumps fox dog")  # "fox" is the 3rd and the 5th token


def relay(min_tokens: int, chunk: int) -> tuple[str, bool]:
    """The text released and whether a stop string ended it, the tokens fed `chunk` at a time."""
    text_relay, text = TextRelay(make_tokenizer(), ("fox",), min_tokens), ""
    for start in range(0, len(TOKENS), chunk):
        out = text_relay.add(TOKENS[start:start + chunk])
        text += out.text
        if out.is_stopped:
            return text, True
    return text + text_relay.finish().text, False


@pytest.mark.parametrize("chunk", [1, 2, 6])
@pytest.mark.parametrize("min_tokens, expected", [
    (0, ("the quick ", True)),
    (3, ("the quick ", True)),  # the 3rd token's text may stop it
    (4, ("the quick fox jumps ", True)),
    (6, ("the quick fox jumps fox dog", False)),
])
def test_stop_strings_wait_for_min_tokens(min_tokens, expected, chunk):
    assert relay(min_tokens, chunk) == expected


@pytest.mark.parametrize("chunk", [1, 6])
def test_include_stop_str_in_output_keeps_the_stop_string(chunk):
    text_relay, text = TextRelay(make_tokenizer(), ("jumps", "fox"), include_stop_str=True), ""
    for start in range(0, len(TOKENS), chunk):
        out = text_relay.add(TOKENS[start:start + chunk])
        text += out.text
        if out.is_stopped:
            break
    assert (text, text_relay.is_stopped) == ("the quick fox", True)


def test_special_tokens_stay_in_the_text_unless_skipped():
    tokens = ids("<s> the fox </s>")
    kept, skipped = (TextRelay(make_tokenizer(), (), skip_special_tokens=skip) for skip in (False, True))
    assert (kept.add(tokens).text + kept.finish().text).split() == ["<s>", "the", "fox", "</s>"]
    assert (skipped.add(tokens).text + skipped.finish().text).split() == ["the", "fox"]
