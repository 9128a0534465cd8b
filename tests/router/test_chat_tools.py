"""Earlier tool calls in a conversation reach the chat template as vLLM passes them: the assistant's
`tool_calls` with their JSON arguments as objects, and `tool` messages with their `tool_call_id`."""
import copy

import pytest

from pdserve.router.chat import TemplateOptions, parse_messages, render_chat
from pdserve.router.errors import InvalidParameter

from router_fakes import make_tokenizer

CALL = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call-1", "content": [{"type": "text", "text": "sunny"}]},
]
# Prints what a tool template reads: each call's name and its arguments' items, and the answered call's id.
TOOL_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}:{% for c in m.tool_calls or [] %} {{ c.function.name }}"
    "{% for k, v in c.function.arguments.items() %} {{ k }}={{ v }}{% endfor %}{% endfor %}"
    "{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %} {{ m.content }}|{% endfor %}"
)


def test_tool_calls_and_tool_messages_reach_the_template():
    tokenizer = copy.copy(make_tokenizer())
    tokenizer.chat_template = TOOL_TEMPLATE
    messages = parse_messages(CONVERSATION)
    assert [m.as_template_input() for m in messages][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [{**CALL, "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call-1"},
    ]
    text = tokenizer.apply_chat_template([m.as_template_input() for m in messages], tokenize=False)
    assert text == "user: hello|assistant: get_weather city=Paris |tool: (call-1) sunny|"
    assert render_chat(messages, tokenizer, TemplateOptions(add_generation_prompt=False))  # what is served


def test_empty_arguments_are_an_empty_object_and_an_empty_tool_calls_list_a_plain_message():
    no_arguments = {**CALL, "function": {"name": "now", "arguments": ""}}
    call, plain = parse_messages([{"role": "assistant", "content": None, "tool_calls": [no_arguments]},
                                  {"role": "assistant", "content": "hi", "tool_calls": []}])
    assert call.as_template_input()["tool_calls"][0]["function"]["arguments"] == {}
    assert plain.as_template_input() == {"role": "assistant", "content": "hi"}


@pytest.mark.parametrize("message, param", [
    ({"role": "user", "content": None}, "messages.[0].content"),
    ({"role": "assistant", "content": None}, "messages.[0].content"),
    ({"role": "user", "content": "x", "tool_calls": [CALL]}, "messages.[0].tool_calls"),
    ({"role": "assistant", "content": "x", "tool_call_id": "call-1"}, "messages.[0].tool_call_id"),
    ({"role": "assistant", "content": None, "tool_calls": [{**CALL, "type": "retrieval"}]},
     "messages.[0].tool_calls.[0].type"),
])
def test_misplaced_tool_fields_are_refused(message, param):
    with pytest.raises(InvalidParameter) as refused:
        parse_messages([message])
    assert refused.value.param == param


def test_arguments_that_are_not_json_are_refused():
    bad = {**CALL, "function": {"name": "f", "arguments": "{city"}}
    with pytest.raises(InvalidParameter):
        parse_messages([{"role": "assistant", "content": None, "tool_calls": [bad]}])[0].as_template_input()
