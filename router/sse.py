"""Server-sent events: how a streamed response is spelled and sent.

Each event is one `data: <compact JSON>` line and a blank line; the stream ends
with `data: [DONE]`, as OpenAI's does. `EventStream` stops its producer, and
closes the source it reads from, as soon as the client goes away.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def sse_data(payload: dict) -> str:
    """One event carrying `payload`."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """A `text/event-stream` response whose `close` runs however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], close: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.close_source = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client left mid-send
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
            await self.close_source()
