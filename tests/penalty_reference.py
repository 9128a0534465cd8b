"""The penalties, logit_bias and min_tokens written out plainly, one token at a time: what the
engine's batched device version (engine/penalties.py) must equal."""
from collections import Counter

import torch

from pdserve.engine.messages import SamplingParams


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
                    stop_ids: frozenset[int] = frozenset()) -> torch.Tensor:
    """One row's logits [vocab] after vLLM's rules, in vLLM's order."""
    x = logits.clone()
    for token, bias in params.logit_bias:
        x[token] += bias
    if len(output) < params.min_tokens:
        for token in stop_ids:
            x[token] = float("-inf")
    for token in set(prompt) | set(output):
        x[token] = x[token] / params.repetition_penalty if x[token] > 0 else x[token] * params.repetition_penalty
    for token, count in Counter(output).items():
        x[token] -= params.frequency_penalty * count + params.presence_penalty
    return x


def greedy_generate(model, prompt: list[int], params: SamplingParams, max_tokens: int,
                    stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy tokens of a transformers model under the rules, through its own forward; ends after a stop id."""
    output: list[int] = []
    with torch.no_grad():
        while len(output) < max_tokens:
            logits = model(torch.tensor([prompt + output])).logits[0, -1].float()
            output.append(int(adjusted_logits(logits, params, prompt, output, stop_ids).argmax()))
            if output[-1] in stop_ids:
                break
    return output
