"""Chat messages: checked as OpenAI defines them, rendered with the model's chat template.

Only text is served: a message's content is a string or a list of `text` parts
(joined with newlines). `developer` messages render as `system` (templates know
no other). Control tokens written in a message (say `<|im_start|>`) are encoded
as plain text, never as the token, so a user cannot forge template structure;
a tokenizer that cannot do that for a token refuses the message.
"""
from __future__ import annotations

from typing import Any, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, ValidationError

from pdserve.router.errors import InvalidParameter


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """The `{role, content}` dict a chat template reads."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


def parse_messages(raw: Any) -> list[ChatMessage]:
    """Check `messages`: a non-empty list of text messages with known roles."""
    if not isinstance(raw, list) or not raw:
        raise InvalidParameter("`messages` must be a non-empty list of messages.", "messages", "invalid_value")
    messages = []
    for i, item in enumerate(raw):
        try:
            messages.append(ChatMessage.model_validate(item))
        except ValidationError as error:
            raise _invalid_message(i, error) from None
    return messages


def _invalid_message(index: int, error: ValidationError) -> InvalidParameter:
    """The most specific problem of a message (the deepest in a union), named by its field path."""
    problem = max(error.errors(), key=lambda e: len(e["loc"]))
    fields = set(ChatMessage.model_fields) | set(TextPart.model_fields)
    path = [f"[{part}]" if isinstance(part, int) else part for part in problem["loc"]
            if isinstance(part, int) or part in fields]  # drops union branch tags like "list[TextPart]"
    param = ".".join(["messages", f"[{index}]", *path])
    return InvalidParameter(
        f"Invalid `{param}`: {problem['msg']}. pdserve serves text messages (string content or `text` parts) "
        "with role system, developer, user or assistant.",
        param, "invalid_value",
    )


def render_chat(messages: list[ChatMessage], tokenizer: Any) -> list[int]:
    """The prompt token ids of a conversation, ready for the assistant's turn."""
    if tokenizer.chat_template is None:
        raise InvalidParameter("This model has no chat template; use /v1/completions.", "messages")
    try:
        return list(tokenizer.apply_chat_template(
            [m.as_template_input() for m in messages],
            add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=True,
        ))
    except (jinja2.TemplateError, ValueError) as error:
        raise InvalidParameter(f"The chat template refused the messages: {error}", "messages") from None
