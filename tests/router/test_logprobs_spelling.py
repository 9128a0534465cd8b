"""How the two endpoints spell a step's logprobs: vLLM's ranking, the chosen token first."""
from __future__ import annotations

from pdserve.router.openai_response import Dialect, Logprobs


TOP = ((5, -0.5), (6, -1.0), (7, -2.0))  # the model's three most likely, most likely first


def spelled(kind: str, tokenizer, chosen: int, chosen_logprob: float, n: int) -> dict:
    return Dialect(kind, tokenizer, n).choice(0, "", Logprobs([chosen], [chosen_logprob], [TOP[:n]]), None, False)["logprobs"]


def text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def test_completions_show_the_chosen_token_and_the_n_most_likely(tokenizer):
    sampled_outside = spelled("completion", tokenizer, 9, -4.0, 2)["top_logprobs"][0]
    assert list(sampled_outside.items()) == [(text(tokenizer, 9), -4.0), (text(tokenizer, 5), -0.5),
                                             (text(tokenizer, 6), -1.0)]
    greedy = spelled("completion", tokenizer, 5, -0.5, 2)["top_logprobs"][0]
    assert list(greedy.items()) == [(text(tokenizer, 5), -0.5), (text(tokenizer, 6), -1.0)]


def test_chat_shows_n_entries_the_chosen_token_first(tokenizer):
    greedy = spelled("chat", tokenizer, 5, -0.5, 3)["content"][0]["top_logprobs"]
    assert [(e["token"], e["logprob"]) for e in greedy] == [(text(tokenizer, t), lp) for t, lp in TOP]
    sampled_outside = spelled("chat", tokenizer, 9, -4.0, 2)["content"][0]["top_logprobs"]
    assert [e["token"] for e in sampled_outside] == [text(tokenizer, 9), text(tokenizer, 5)]
    assert sampled_outside[0]["bytes"] == list(text(tokenizer, 9).encode())


def test_zero_alternatives_and_minus_infinity(tokenizer):
    completion = spelled("completion", tokenizer, 5, float("-inf"), 0)
    assert completion["top_logprobs"] == [{text(tokenizer, 5): -9999.0}] and completion["token_logprobs"] == [-9999.0]
    chat = spelled("chat", tokenizer, 5, -0.5, 0)["content"][0]
    assert chat["top_logprobs"] == [] and chat["logprob"] == -0.5
