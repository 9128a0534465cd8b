"""The request bodies of the OpenAI API: what /v1/completions, /v1/chat/completions and vLLM's
/tokenize and /detokenize accept.

As in vLLM, a top-level field pdserve does not know is ignored, with a warning in the log (OpenAI
clients send `metadata`, `store`, `service_tier`...). A field it knows and does not serve, which would
change the output, is refused with a 400 (`unsupported_parameter`) unless it is at its neutral value:
vLLM's guided decoding and structured outputs, beam search, `allowed_token_ids`,
`bad_words` and the others of `UNSERVED`; chat's JSON `response_format` and tool calls. Known fields
with wrong JSON types, and unknown fields inside a known one, are refused (strict pydantic models); a
top-level null is an absent field, as OpenAI and vLLM read it (clients send `"logprobs": null` for
"not set"). `parse_body` turns the first problem into an OpenAI-style 400, never FastAPI's 422.
Besides OpenAI's fields, vLLM's `top_k`, `min_p`, `ignore_eos`, `stop_token_ids`, `repetition_penalty`,
`min_tokens`, `skip_special_tokens`, `spaces_between_special_tokens`, `include_stop_str_in_output`,
`truncate_prompt_tokens`, `prompt_logprobs` (each prompt token's logprob and its N most likely
alternatives, up to 20; completions' `echo` with `logprobs` asks for them too) and `priority` (0 only: pdserve schedules first come, first served, as vLLM
without `--scheduling-policy priority`).
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdserve.router.chat import TemplateOptions
from pdserve.router.errors import InvalidParameter
from pdserve.router.limits import MAX_LOGPROBS

logger = logging.getLogger(__name__)


class Body(BaseModel):
    """A request body, or a part of one: unknown fields and wrong JSON types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def check_unsupported(self) -> None:
        """Refuse what the field types let through but pdserve does not serve (nothing, unless overridden)."""


B = TypeVar("B", bound=Body)


class StreamOptions(Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: the usage so far on every chunk too


class FunctionTool(Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionTool


class ChatTemplateFields(Body):
    """vLLM's fields on how a conversation becomes a prompt (chat completions and /tokenize)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None

    def template_options(self) -> TemplateOptions:
        """The rendering options; a contradictory or reserved one is a 400."""
        tools = [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None
        return TemplateOptions(self.add_generation_prompt, self.continue_final_message, tools,
                               self.chat_template_kwargs or {})


class RequestBody(Body):
    """Fields both endpoints take."""

    model: str | None = None  # as in vLLM: absent means the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    user: str | None = None  # accepted, unused
    min_p: float = 0.0
    skip_special_tokens: bool = True
    # Accepted, no effect: vLLM hands it to slow tokenizers only, and transformers 5's decode reads it nowhere.
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # keep the last N prompt tokens; -1: the prompt limit
    priority: int = 0
    presence_penalty: float | None = None  # null: 0
    frequency_penalty: float | None = None  # null: 0
    repetition_penalty: float | None = None  # null: 1
    min_tokens: int = 0
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    prompt_field: ClassVar[str]

    def check_unsupported(self) -> None:
        if self.priority != 0:
            raise InvalidParameter("`priority` must be 0: pdserve serves requests first come, first served "
                                   "(vLLM refuses it too without priority scheduling).", "priority", "invalid_value")
        if self.truncate_prompt_tokens == 0:
            raise InvalidParameter("`truncate_prompt_tokens` must be at least 1, or -1 for the longest prompt "
                                   "allowed.", "truncate_prompt_tokens", "invalid_value")
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options", "invalid_value",
            )

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Whether every stream chunk carries the usage so far (vLLM's `continuous_usage_stats`)."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The completion budget asked for, and the field that asked."""
        return self.max_tokens, "max_tokens"

    def logit_bias_by_id(self) -> dict[int, float]:
        """`logit_bias` keyed by token id; a key that is not an integer is a 400."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidParameter(f"`logit_bias` keys must be token ids, got {key!r}.", "logit_bias",
                                       "invalid_value") from None
        return bias

    def wants_logprobs(self) -> bool:
        raise NotImplementedError

    def num_top_logprobs(self) -> int:
        """The most likely alternatives asked for at each token (0 with logprobs: the chosen token's only)."""
        raise NotImplementedError

    def num_prompt_logprobs(self) -> int | None:
        """The alternatives asked for at each prompt token (None: no prompt logprobs)."""
        return self.prompt_logprobs


class CompletionBody(RequestBody):
    prompt: Any  # text, token ids, or a list of either: checked by `text.prompt_token_ids`
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = True  # a text prompt's BOS (chat's rendering adds none: `UNSERVED` there)

    prompt_field = "prompt"

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def num_top_logprobs(self) -> int:
        return self.logprobs or 0

    def num_prompt_logprobs(self) -> int | None:
        """As vLLM: `echo` with `logprobs` scores the prompt too, with as many alternatives."""
        if self.prompt_logprobs is None and self.echo and self.logprobs is not None:
            return self.logprobs
        return self.prompt_logprobs


class ChatBody(RequestBody, ChatTemplateFields):
    messages: Any  # checked by `chat.parse_messages`
    response_format: dict[str, Any] | None = None  # {"type": "text"} only: pdserve constrains no output
    tool_choice: str | dict[str, Any] | None = None  # "none" only: pdserve parses no tool calls
    parallel_tool_calls: bool | None = None  # accepted, unused (as in vLLM)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    prompt_field = "messages"

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameter("`top_logprobs` requires `logprobs` to be true.", "top_logprobs", "invalid_value")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidParameter("Set `max_tokens` or `max_completion_tokens`, not both.",
                                   "max_completion_tokens", "invalid_value")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise InvalidParameter(
                f"`response_format` of type {self.response_format.get('type')!r} is not supported by pdserve, which "
                'constrains no output to JSON or a schema; send {"type": "text"} or leave it out.',
                "response_format", "unsupported_parameter")
        if self.tool_choice not in (None, "none") or (self.tools and self.tool_choice is None):
            raise InvalidParameter(
                'pdserve parses no tool calls: with `tools`, set `tool_choice` to "none" (the chat template is '
                "shown the tools, the answer is plain text), or leave both out.", "tool_choice",
                "unsupported_parameter")

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def wants_logprobs(self) -> bool:
        return self.logprobs

    def num_top_logprobs(self) -> int:
        return self.top_logprobs or 0


class TokenizePromptBody(Body):
    """POST /tokenize with a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatBody(ChatTemplateFields):
    """POST /tokenize with a conversation, rendered as chat completions render it."""

    model: str | None = None
    messages: Any  # checked by `chat.parse_messages`
    return_token_strs: bool = False


class DetokenizeBody(Body):
    model: str | None = None
    tokens: list[int]


# Fields of OpenAI's or vLLM's APIs that would change the output and that pdserve does not serve ->
# their neutral value, the one accepted (besides null). Any other value is a 400.
UNSERVED: dict[str, Any] = {
    "suffix": "", "best_of": 1, "use_beam_search": False, "guided_json": None,
    "guided_regex": None, "guided_choice": None, "guided_grammar": None, "structural_tag": None,
    "structured_outputs": None, "allowed_token_ids": None, "bad_words": [], "logits_processors": None,
    "return_tokens_as_token_ids": False, "return_token_ids": False, "prompt_embeds": None,
    "add_special_tokens": False, "chat_template": None, "documents": None, "functions": None,
    "function_call": None, "audio": None, "modalities": ["text"], "web_search_options": None,
}


def parse_body(cls: type[B], payload: dict) -> B:
    """Validate `payload` into `cls`, turning the first problem into an OpenAI-style 400; top-level
    fields it does not know are dropped with a warning, those of `UNSERVED` refused unless neutral."""
    present = {name: value for name, value in payload.items() if value is not None}
    for name, value in present.items():
        if name in UNSERVED and name not in cls.model_fields and value != UNSERVED[name]:
            raise InvalidParameter(f"`{name}` is not supported by pdserve.", name, "unsupported_parameter")
    ignored = sorted(name for name in present if name not in cls.model_fields and name not in UNSERVED)
    if ignored:
        logger.warning("request fields ignored (pdserve does not know them): %s", ", ".join(ignored))
    try:
        body = cls.model_validate({name: value for name, value in present.items() if name in cls.model_fields})
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":  # inside a known field (a top-level one is dropped above)
            raise InvalidParameter(f"Unrecognized request argument supplied: {'.'.join(map(str, first['loc']))}",
                                   name, "unknown_parameter")
        if first["type"] == "missing":
            raise InvalidParameter(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
        code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
        raise InvalidParameter(f"Invalid value for '{name}': {first['msg']}.", name, code) from None
    body.check_unsupported()
    return body
