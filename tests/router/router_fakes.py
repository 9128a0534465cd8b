"""A real (tiny, offline) tokenizer and a scripted backend for the router's API tests."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pdserve.router.generation import (
    GenerationChunk, GenerationError, GenerationRequest, HealthStatus, PhaseTimings, Usage,
)
from pdserve.engine.messages import PromptLogprob
from pdserve.router.limits import RequestLimits
from pdserve.router.served_models import ServedModels

WORDS = ["<unk>", "<s>", "</s>", "user:", "assistant:", "system:", "hello", "world", "the", "quick",
         "brown", "fox", "jumps", "over", "lazy", "dog", "stop", "!"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
MODEL = "tiny-model"
ALIAS = "/models/tiny-model"  # a second served name, spelled as a path
SERVED = ServedModels((MODEL, ALIAS))
LIMITS = RequestLimits(max_model_len=64, max_body_bytes=4096, max_prompt_tokens=None, max_tokens=48, max_n=4,
                       max_stop=3, request_timeout_s=30.0)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS, with a `role: content` chat template."""
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def ids(text: str) -> list[int]:
    """The tokens of a text of WORDS."""
    return [WORDS.index(w) for w in text.split()]


def _prompt_logprobs(prompt: tuple[int, ...], num_top: int | None) -> tuple[PromptLogprob, ...] | None:
    """Every prompt token after the first at -1.0, ranked 2nd, behind the token after it at -0.5."""
    if num_top is None:
        return None
    return tuple(PromptLogprob(t, -1.0, 2, tuple((t + 1 + j, -0.5 - j) for j in range(num_top))) for t in prompt[1:])


@dataclass
class EchoBackend:
    """Generates the prompt's tokens back, one a chunk, as `max_tokens` allows.

    A generated word in `sampling.stop` ends the choice with "stop". `refuse`
    fails before the first chunk, `fail_after` after that many chunks, and
    `hang_after` waits forever after that many chunks (until cancelled).
    """

    tokenizer: PreTrainedTokenizerFast
    ready: bool = True
    refuse: Exception | None = None
    fail_after: tuple[int, GenerationError] | None = None
    hang_after: int | None = None
    requests: list[GenerationRequest] = field(default_factory=list)
    num_closed: int = 0

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        try:
            if self.refuse is not None:
                raise self.refuse
            prompt, sampling = request.prompt_token_ids, request.sampling
            for i in range(sampling.max_tokens):
                if self.fail_after is not None and i == self.fail_after[0]:
                    raise self.fail_after[1]
                if self.hang_after is not None and i == self.hang_after:
                    await asyncio.Event().wait()
                token = prompt[i % len(prompt)]
                word = self.tokenizer.decode([token])
                stopped = word in sampling.stop
                last = stopped or i == sampling.max_tokens - 1
                yield GenerationChunk(
                    token_ids=() if stopped else (token,),
                    text="" if stopped else word + " ",
                    logprobs=(() if stopped else (-0.25,)) if sampling.logprobs else None,
                    top_logprobs=(() if stopped else (tuple((token + j, -0.25 - j) for j in range(sampling.top_logprobs)),))
                    if sampling.logprobs else None,
                    prompt_logprobs=_prompt_logprobs(prompt, sampling.prompt_logprobs) if i == 0 else None,
                    finish_reason=("stop" if stopped else "length") if last else None,
                    usage=Usage(len(prompt), i + (0 if stopped else 1)) if last else None,
                    timings=PhaseTimings(ttft_s=0.01, e2e_s=0.02 + i / 1000, prefill_replica="prefill-0",
                                         decode_replica="decode-0") if last else None,
                )
                if stopped:
                    return
                await asyncio.sleep(0)
        finally:
            self.num_closed += 1

    async def health(self) -> HealthStatus:
        return HealthStatus(ready=self.ready, prefill_replicas=1, decode_replicas=int(self.ready),
                            detail="" if self.ready else "no decode replica")
