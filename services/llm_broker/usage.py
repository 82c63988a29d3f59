"""Token usage from provider answers: a whole JSON body or an SSE stream read as it passes.

The broker never buffers a stream for this: each chunk is forwarded first and then fed
here. Providers report usage in different places:

- OpenAI chat completions: ``usage.prompt_tokens`` / ``completion_tokens`` (in the last
  stream chunk when the client asked for ``stream_options.include_usage``);
- OpenAI responses: ``usage.input_tokens`` / ``output_tokens``, streamed in ``response.completed``;
- Anthropic messages: ``message_start.message.usage.input_tokens`` and
  ``message_delta.usage.output_tokens``.

When an answer carries no usage at all, completion tokens are estimated from everything
generated (about four characters a token): text, reasoning, refusals and tool-call arguments
in every API's delta shape, so a budget can never be dodged by hiding usage. The broker also
asks OpenAI-style providers for usage on streams (requests.py).
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


# Generated-text fields of an OpenAI chat delta (or message), of an Anthropic delta or block.
_CHAT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal", "text")
_ANTHROPIC_FIELDS = ("text", "thinking", "partial_json")


def _str_len(v: Any) -> int:
    return len(v) if isinstance(v, str) else 0


def _calls_chars(calls: Any) -> int:
    """OpenAI tool_calls (a list) or a legacy function_call (one object): names and arguments."""
    n = 0
    for call in calls if isinstance(calls, list) else (calls,):
        if isinstance(call, dict):
            fn = call.get("function", call)
            if isinstance(fn, dict):
                n += _str_len(fn.get("name")) + _str_len(fn.get("arguments"))
    return n


def _generated_chars(event: dict[str, Any]) -> int:
    """Characters of generated output in one stream event, whatever the API."""
    n = 0
    for choice in event.get("choices") or ():
        if isinstance(choice, dict):
            n += _str_len(choice.get("text"))  # legacy completions
            delta = choice.get("delta")
            if isinstance(delta, dict):
                n += sum(_str_len(delta.get(f)) for f in _CHAT_FIELDS)
                n += _calls_chars(delta.get("tool_calls")) + _calls_chars(delta.get("function_call"))
    delta = event.get("delta")
    kind = event.get("type")
    if isinstance(delta, dict):  # anthropic content_block_delta: text, thinking, input_json
        n += sum(_str_len(delta.get(f)) for f in _ANTHROPIC_FIELDS)
    elif isinstance(delta, str) and isinstance(kind, str) and kind.endswith(".delta"):
        n += len(delta)  # responses: output_text, reasoning*, function_call_arguments, refusal ...
    block = event.get("content_block")
    if isinstance(block, dict):  # anthropic content_block_start: a tool's name, any initial text
        n += _str_len(block.get("name")) + sum(_str_len(block.get(f)) for f in _ANTHROPIC_FIELDS)
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
        self._chars += _generated_chars(event)

    def finish(self) -> Usage:
        if not self.streaming:
            if len(self._buf) <= MAX_JSON:
                try:
                    body = json.loads(self._buf)
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    _apply_usage(self.usage, body.get("usage"))
                    if not self.usage.reported and any(k in body for k in ("choices", "content", "output")):
                        # A generation that hides its usage: the whole answer counts.
                        self._chars = len(self._buf)
        elif self._buf:
            self.feed(b"\n")
        if not self.usage.reported and self._chars:
            self.usage.completion_tokens = -(-self._chars // CHARS_PER_TOKEN)
        return self.usage
