"""Chat messages: checked as OpenAI defines them, rendered with the model's chat template.

Only text is served: a message's content is a string or a list of `text` parts
(joined with newlines). `developer` messages render as `system` (templates know
no other). A conversation may carry earlier tool calls as vLLM passes them on: an
assistant message with `tool_calls` (its content may be null; each call's JSON
`arguments` string reaches the template as an object, as transformers' tool
templates expect) and `tool` messages answering them by `tool_call_id`. `TemplateOptions` carries vLLM's rendering fields: no assistant turn
opened, the last message continued, tools shown to the template, and extra
template variables. Control tokens written in a message (say `<|im_start|>`) are encoded
as plain text, never as the token, so a user cannot forge template structure;
a tokenizer that cannot do that for a token refuses the message.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, ValidationError

from pdserve.router.errors import InvalidParameter


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    """A call the assistant made earlier in the conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"]
    function: CalledFunction

    def as_template_input(self) -> dict[str, Any]:
        """The call with its arguments as an object (empty arguments: an empty one), as vLLM passes it."""
        try:
            arguments = json.loads(self.function.arguments) if self.function.arguments else {}
        except ValueError:
            raise InvalidParameter(f"The arguments of tool call {self.id!r} are not JSON.", "messages",
                                   "invalid_value") from None
        return {"id": self.id, "type": self.type, "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # null only beside an assistant's tool_calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # the assistant's
    tool_call_id: str | None = None  # a tool message's: the call it answers

    def as_template_input(self) -> dict[str, Any]:
        """The `{role, content, ...}` dict a chat template reads."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or ())
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:  # an empty list: a plain assistant message, as vLLM drops it
            message["tool_calls"] = [call.as_template_input() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def parse_messages(raw: Any) -> list[ChatMessage]:
    """Check `messages`: a non-empty list of text messages with known roles."""
    if not isinstance(raw, list) or not raw:
        raise InvalidParameter("`messages` must be a non-empty list of messages.", "messages", "invalid_value")
    messages = []
    for i, item in enumerate(raw):
        try:
            message = ChatMessage.model_validate(item)
        except ValidationError as error:
            raise _invalid_message(i, error) from None
        _check_roles_fields(i, message)
        messages.append(message)
    return messages


def _check_roles_fields(index: int, message: ChatMessage) -> None:
    """Refuse fields of another role's, and a null content where no tool call stands for it."""
    param = f"messages.[{index}]"
    if message.tool_calls is not None and message.role != "assistant":
        raise InvalidParameter(f"`{param}.tool_calls` is for assistant messages only.", f"{param}.tool_calls",
                               "invalid_value")
    if message.tool_call_id is not None and message.role != "tool":
        raise InvalidParameter(f"`{param}.tool_call_id` is for tool messages only.", f"{param}.tool_call_id",
                               "invalid_value")
    if message.content is None and not message.tool_calls:
        raise InvalidParameter(f"`{param}.content` may be null only in an assistant message with `tool_calls`.",
                               f"{param}.content", "invalid_value")


def _invalid_message(index: int, error: ValidationError) -> InvalidParameter:
    """The most specific problem of a message (the deepest in a union), named by its field path."""
    problem = max(error.errors(), key=lambda e: len(e["loc"]))
    fields = (set(ChatMessage.model_fields) | set(TextPart.model_fields) | set(ToolCall.model_fields)
              | set(CalledFunction.model_fields))
    path = [f"[{part}]" if isinstance(part, int) else part for part in problem["loc"]
            if isinstance(part, int) or part in fields]  # drops union branch tags like "list[TextPart]"
    param = ".".join(["messages", f"[{index}]", *path])
    return InvalidParameter(
        f"Invalid `{param}`: {problem['msg']}. pdserve serves text messages (string content or `text` parts) "
        "with role system, developer, user, assistant or tool.",
        param, "invalid_value",
    )


# Names a template never gets from `chat_template_kwargs`: the renderer's own arguments and variables.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


@dataclass(frozen=True)
class TemplateOptions:
    """How a conversation is rendered (vLLM's request fields of the same names)."""

    add_generation_prompt: bool = True  # open the assistant's turn
    continue_final_message: bool = False  # leave the last message open, for the model to go on with it
    tools: list[dict[str, Any]] | None = None  # shown to the template; pdserve parses no tool calls
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # extra template variables

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidParameter("Set at most one of `add_generation_prompt` and `continue_final_message`: "
                                   "continuing the last message opens no new turn.", "continue_final_message",
                                   "invalid_value")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(self.template_kwargs))
        if reserved:
            raise InvalidParameter(f"`chat_template_kwargs` may not set `{reserved[0]}`; it has its own request "
                                   "field or is the renderer's.", "chat_template_kwargs", "invalid_value")


def render_chat(messages: list[ChatMessage], tokenizer: Any, options: TemplateOptions) -> list[int]:
    """The prompt token ids of a conversation, rendered as `options` say."""
    if tokenizer.chat_template is None:
        raise InvalidParameter("This model has no chat template; use /v1/completions.", "messages")
    try:
        return list(tokenizer.apply_chat_template(
            [m.as_template_input() for m in messages], tools=options.tools,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, tokenize=True, return_dict=False,
            sanitize_control_tokens=True, **options.template_kwargs,
        ))
    except (jinja2.TemplateError, ValueError, TypeError) as error:
        raise InvalidParameter(f"The chat template refused the messages: {error}", "messages") from None
