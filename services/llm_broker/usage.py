"""Token usage from provider answers: a whole JSON body or an SSE stream read as it passes.

The broker never buffers a stream for this: each chunk is forwarded first and then fed
here. Providers report usage in different places:

- OpenAI chat completions: ``usage.prompt_tokens`` / ``completion_tokens`` (in the last
  stream chunk when the client asked for ``stream_options.include_usage``);
- OpenAI responses: ``usage.input_tokens`` / ``output_tokens``, streamed in ``response.completed``;
- Anthropic messages: ``message_start.message.usage.input_tokens`` and
  ``message_delta.usage.output_tokens``.

When a stream carries no usage at all, completion tokens are estimated from the text
(about four characters a token) so a budget can never be dodged by hiding usage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
MAX_LINE = 1 << 20  # a longer SSE line is not parsed (it is still forwarded)
MAX_JSON = 16 << 20  # nor a longer JSON answer


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reported: bool = False  # False: estimated from the text

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _int(v: Any) -> int:
    return v if isinstance(v, int) and v >= 0 else 0


def _apply_usage(usage: Usage, u: Any) -> None:
    if not isinstance(u, dict):
        return
    prompt = _int(u.get("prompt_tokens")) or _int(u.get("input_tokens"))
    completion = _int(u.get("completion_tokens")) or _int(u.get("output_tokens"))
    if prompt or completion:
        usage.reported = True
        usage.prompt_tokens = max(usage.prompt_tokens, prompt)
        usage.completion_tokens = max(usage.completion_tokens, completion)


def _text_chars(event: dict[str, Any]) -> int:
    n = 0
    for choice in event.get("choices") or ():
        if isinstance(choice, dict):
            delta = choice.get("delta") or {}
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                n += len(delta["content"])
    delta = event.get("delta")
    if isinstance(delta, dict) and isinstance(delta.get("text"), str):  # anthropic content_block_delta
        n += len(delta["text"])
    if event.get("type") == "response.output_text.delta" and isinstance(event.get("delta"), str):
        n += len(event["delta"])
    return n


class UsageMeter:
    """Fed every byte of an answer, in order; knows the usage at the end."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.usage = Usage()
        self._buf = bytearray()
        self._chars = 0

    def feed(self, chunk: bytes) -> None:
        if not self.streaming:
            if len(self._buf) <= MAX_JSON:
                self._buf += chunk
            return
        self._buf += chunk
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    self._buf.clear()
                return
            line = bytes(self._buf[:nl]).strip()
            del self._buf[: nl + 1]
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        if not data or data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        _apply_usage(self.usage, event.get("usage"))
        message = event.get("message")
        if isinstance(message, dict):
            _apply_usage(self.usage, message.get("usage"))
        response = event.get("response")
        if isinstance(response, dict):
            _apply_usage(self.usage, response.get("usage"))
        delta = event.get("delta")
        if isinstance(delta, dict):
            _apply_usage(self.usage, delta.get("usage"))
        self._chars += _text_chars(event)

    def finish(self) -> Usage:
        if not self.streaming:
            if len(self._buf) <= MAX_JSON:
                try:
                    body = json.loads(self._buf)
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    _apply_usage(self.usage, body.get("usage"))
        elif self._buf:
            self.feed(b"\n")
        if not self.usage.reported and self._chars:
            self.usage.completion_tokens = -(-self._chars // CHARS_PER_TOKEN)
        return self.usage
