"""What the broker reads from (and adds to) a model call's JSON body before it goes out:
how many tokens the call may use (for its budget reservation), and, on an OpenAI-style
stream, a request for usage (``stream_options.include_usage``) so the provider reports
exact tokens instead of leaving the broker to estimate them.

Asking for usage adds one chunk at the end of the stream (``choices: []`` with ``usage``);
it is passed on to the caller like every other chunk: the OpenAI SDKs and OpenClaw accept
it, and the broker never rewrites a provider's stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.llm_broker.usage import CHARS_PER_TOKEN

MAX_PARSE = 4 << 20  # a larger body is not parsed: its size alone is a large reservation
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_USAGE_PATHS = ("chat/completions", "completions")
_NO_ANSWER_PATHS = ("embeddings", "v1/messages/count_tokens")  # no generated tokens to hold


@dataclass(frozen=True)
class Prepared:
    body: bytes
    reserve: int  # tokens to hold for this call: the prompt's estimate plus its answer's ceiling
    asked_usage: bool  # include_usage was added by the broker


def _max_tokens(doc: dict[str, Any], default: int) -> int:
    for f in _MAX_TOKEN_FIELDS:
        v = doc.get(f)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return default


def prepare(api: str, rest: str, body: bytes, default_answer: int, ask_usage: bool) -> Prepared:
    """The body to send and the call's reservation. A body that is not a JSON object is sent
    as it came and reserved at its size plus the default answer."""
    prompt = -(-len(body) // CHARS_PER_TOKEN)
    if rest in _NO_ANSWER_PATHS:
        default_answer = 0
    if not body or len(body) > MAX_PARSE or body[:1] not in b"{ \t\r\n":
        return Prepared(body, prompt + default_answer, False)
    try:
        doc = json.loads(body)
    except ValueError:
        return Prepared(body, prompt + default_answer, False)
    if not isinstance(doc, dict):
        return Prepared(body, prompt + default_answer, False)
    reserve = prompt + _max_tokens(doc, default_answer)
    if not (ask_usage and api.startswith("openai") and rest in _USAGE_PATHS and doc.get("stream") is True):
        return Prepared(body, reserve, False)
    options = doc.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return Prepared(body, reserve, False)
    doc["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return Prepared(json.dumps(doc, ensure_ascii=False).encode(), reserve, True)
