"""Local stand-ins for the outside world, for tests and ``zaki up --demo``:
an OpenAI-compatible LLM that echoes, and a Telegram Bot API that knows a set of bots.

    python -m zaki.fakes --llm-port 8000 --telegram-port 8001 --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

INTERNAL_MARKER = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>"


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def last_real_user_text(messages: list[dict]) -> str:
    """The user's words: OpenClaw adds a "[<time>] " prefix and a "Runtime: ..." trailer."""
    for m in reversed(messages):
        if m.get("role") == "user":
            text = _text_of(m.get("content"))
            if not text.startswith(INTERNAL_MARKER):
                text = re.sub(r"^\[[^\]]*\]\s*", "", text)
                return text.split("\n\nRuntime:", 1)[0].strip()
    return ""


@dataclass
class FakeLLM:
    """Answers ``POST /v1/chat/completions`` with ``echo: <last user text>`` (JSON or SSE)."""

    calls: list[dict] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    # When set, only these keys are accepted (401 otherwise), like a real provider.
    accepted_keys: set[str] | None = None
    chunk_delay_s: float = 0.2  # between the chunks of a "slow ..." answer

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/messages", self.messages)
        return app

    def _refused(self, key: str) -> web.Response | None:
        if self.accepted_keys is not None and key not in self.accepted_keys:
            return web.json_response(
                {"error": {"message": "invalid key", "type": "invalid_request_error"}}, status=401
            )
        return None

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API, enough for a broker test."""
        body = await request.json()
        self.calls.append(body)
        key = request.headers.get("x-api-key", "")
        self.auth_headers.append(key)
        if (refused := self._refused(key)) is not None:
            return refused
        text = "echo: " + last_real_user_text(body.get("messages", []))
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model", "echo-1"),
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 7, "output_tokens": 4},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for name, data in (
            (
                "message_start",
                {"type": "message_start", "message": {"id": "msg_fake", "usage": {"input_tokens": 7}}},
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}},
            ),
            ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 4}}),
            ("message_stop", {"type": "message_stop"}),
        ):
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "echo-1", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(body)
        auth = request.headers.get("Authorization", "")
        self.auth_headers.append(auth)
        if (refused := self._refused(auth.removeprefix("Bearer "))) is not None:
            return refused
        text = "echo: " + last_real_user_text(body.get("messages", []))
        text = text.replace(INTERNAL_MARKER, "")
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": "echo-1"}
        if not body.get("stream"):
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "usage": usage,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(delta: dict, finish: str | None, **extra) -> bytes:
            obj = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": ""}, None))
        if text.startswith("echo: slow"):
            # One word per chunk, spaced out: lets a test see chunks arrive one by one.
            for word in text.split():
                await asyncio.sleep(self.chunk_delay_s)
                await resp.write(chunk({"content": word + " "}, None))
        else:
            await resp.write(chunk({"content": text}, None))
        await resp.write(chunk({}, "stop", usage=usage) + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@dataclass
class FakeTelegram:
    """Answers the Bot API methods a gateway calls; ``getMe`` succeeds only for known tokens
    (or for every well-formed token when ``accept_all``)."""

    bots: dict[str, str] = field(default_factory=dict)  # token -> username
    accept_all: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)  # (bot id, method)

    def add_bot(self, token: str, username: str) -> None:
        self.bots[token] = username

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self.method)
        return app

    async def method(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        method = request.match_info["method"]
        self.calls.append((token.split(":", 1)[0], method))
        username = self.bots.get(token) or (f"bot{token.split(':', 1)[0]}" if self.accept_all else None)
        if username is None:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        if method == "getMe":
            bot_id = int(token.split(":", 1)[0])
            return web.json_response(
                {
                    "ok": True,
                    "result": {
                        "id": bot_id,
                        "is_bot": True,
                        "first_name": username,
                        "username": username,
                        "can_join_groups": True,
                        "can_read_all_group_messages": False,
                        "supports_inline_queries": False,
                    },
                }
            )
        if method == "getUpdates":
            await asyncio.sleep(1.0)
            return web.json_response({"ok": True, "result": []})
        return web.json_response({"ok": True, "result": True})


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]


async def _main(args: argparse.Namespace) -> None:
    llm = await serve(FakeLLM().app(), args.host, args.llm_port)
    tg = await serve(FakeTelegram(accept_all=True).app(), args.host, args.telegram_port)
    print(json.dumps({"llm": bound_port(llm), "telegram": bound_port(tg)}), flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--llm-port", type=int, default=0)
    p.add_argument("--telegram-port", type=int, default=0)
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
