"""Prompt logprobs: each prompt token's log-probability given the tokens before it.

The prefill computes logits for every position of a chunk that asks (`PrefillChunk.scores_prompt`);
the logits at position p score the prompt token at p + 1. A chunk's last row scores the next
chunk's first token, so the caller names each row's target from the whole prompt.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .messages import PromptLogprob
from .runner import PrefillChunk


def score_chunk(logits: torch.Tensor, prompt: Sequence[int], chunk: PrefillChunk, num_top: int) -> list[PromptLogprob]:
    """The prompt logprobs a chunk's rows of `ModelRunner.prefill` give: row i scores the prompt token
    after it (the last chunk's last row scores none: it gives the first token)."""
    targets = prompt[chunk.start_pos + 1:chunk.start_pos + len(chunk.token_ids) + 1]
    return score_prompt(logits[:len(targets)], targets, num_top)


def score_prompt(logits: torch.Tensor, targets: Sequence[int], num_top: int) -> list[PromptLogprob]:
    """Each target's logprob and rank under its row of `logits` [len(targets), vocab], with the
    `num_top` most likely tokens; one read back to the host."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target_ids = torch.tensor(list(targets), dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, target_ids[:, None])  # [n, 1]
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top = logprobs.topk(num_top, dim=-1) if num_top else None
    chosen_list, rank_list = chosen[:, 0].tolist(), ranks.tolist()
    top_ids = top.indices.tolist() if top else [[] for _ in targets]
    top_values = top.values.tolist() if top else [[] for _ in targets]
    return [PromptLogprob(token, logprob, rank, tuple(zip(ids, values)))
            for token, logprob, rank, ids, values in zip(targets, chosen_list, rank_list, top_ids, top_values)]
