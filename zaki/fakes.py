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
    headers: list[dict[str, str]] = field(default_factory=list)  # every request's headers, in order
    redirects: int = 0  # requests answered by /redirect/...
    # When set, only these keys are accepted (401 otherwise), like a real provider.
    accepted_keys: set[str] | None = None
    chunk_delay_s: float = 0.2  # between the chunks of a "slow ..." answer

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/messages", self.messages)
        # Answers every call with a redirect to this fake's own chat endpoint: a client that
        # follows it shows up as one more call.
        app.router.add_route("*", "/redirect/{tail:.*}", self.redirect)
        return app

    async def redirect(self, request: web.Request) -> web.Response:
        self.redirects += 1
        self.headers.append(dict(request.headers))
        target = f"http://{request.host}/v1/chat/completions"
        return web.Response(status=307, headers={"Location": target})

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
        self.headers.append(dict(request.headers))
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
        self.headers.append(dict(request.headers))
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
        if text.startswith("echo: silent"):
            # Reasoning and a tool call only, and no usage even when asked: a provider (or a
            # user's own endpoint) that hides what it generated.
            for _ in range(5):
                await resp.write(chunk({"reasoning_content": "r" * 80}, None))
            call = {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
            await resp.write(chunk({"tool_calls": [call]}, None))
            for _ in range(5):
                await resp.write(
                    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "a" * 80}}]}, None)
                )
            await resp.write(chunk({}, "tool_calls") + b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
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


CONFLICT = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"


@dataclass
class _Poll:
    """One getUpdates long poll waiting for updates."""

    request: web.Request
    done: asyncio.Event = field(default_factory=asyncio.Event)
    terminated: bool = False


@dataclass
class FakeTelegram:
    """Answers the Bot API methods a gateway calls; ``getMe`` succeeds only for known tokens
    (or for every well-formed token when ``accept_all``).

    ``getUpdates`` behaves like Telegram's where it matters for waking a suspended gateway:
    updates are queued per bot and kept until a call confirms them with an ``offset`` above
    their ``update_id``; a call long-polls up to its ``timeout`` (capped by ``max_poll_s``);
    a second concurrent call on the same bot terminates the first, which gets 409 Conflict
    (recorded in ``conflicts`` when that caller was still connected). Tests inject a user's
    message with ``inject_message`` and read the bot's answers in ``sent``."""

    bots: dict[str, str] = field(default_factory=dict)  # token -> username
    accept_all: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)  # (bot id, method)
    max_poll_s: float = 30.0
    # Per bot id: unconfirmed updates, oldest first.
    pending: dict[str, list[dict]] = field(default_factory=dict)
    # Every update a getUpdates call returned: (bot id, update_id, caller tag).
    delivered: list[tuple[str, int, str]] = field(default_factory=list)
    conflicts: list[tuple[str, float]] = field(default_factory=list)  # (bot id, time)
    polls: list[tuple[str, dict]] = field(default_factory=list)  # every getUpdates: (bot id, its parameters)
    poll_times: list[float] = field(default_factory=list)  # when each of them arrived (monotonic)
    sent: list[dict] = field(default_factory=list)  # sendMessage calls: bot, chat_id, text
    # Per bot id: answers to give to the next getUpdates calls instead of polling, e.g.
    # (429, {"retry_after": 1}) or (502, None), for backoff tests.
    scripted: dict[str, list[tuple[int, dict | None]]] = field(default_factory=dict)
    _polls: dict[str, _Poll] = field(default_factory=dict)
    _next_id: dict[str, int] = field(default_factory=dict)
    _arrived: dict[str, asyncio.Event] = field(default_factory=dict)
    _closing: bool = False

    def add_bot(self, token: str, username: str) -> None:
        self.bots[token] = username

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self.method)
        app.on_shutdown.append(self._release_polls)
        return app

    # --- what tests use ------------------------------------------------------------------------

    @staticmethod
    def bot_id(token_or_id: str) -> str:
        return token_or_id.split(":", 1)[0]

    def inject_message(self, bot: str, text: str, chat_id: int = 4242, from_id: int | None = None) -> int:
        """A user writes *text* to the bot (token or bot id); returns the update id."""
        bid = self.bot_id(bot)
        update_id = self._next_id.get(bid, 100_000) + 1
        self._next_id[bid] = update_id
        sender = from_id if from_id is not None else chat_id
        self.pending.setdefault(bid, []).append(
            {
                "update_id": update_id,
                "message": {
                    "message_id": update_id - 100_000,
                    "date": int(time.time()),
                    "chat": {"id": chat_id, "type": "private", "first_name": "Ann"},
                    "from": {"id": sender, "is_bot": False, "first_name": "Ann"},
                    "text": text,
                },
            }
        )
        self._event(bid).set()
        return update_id

    def unconfirmed(self, bot: str) -> list[int]:
        return [u["update_id"] for u in self.pending.get(self.bot_id(bot), [])]

    def answers(self, bot: str) -> list[dict]:
        bid = self.bot_id(bot)
        return [m for m in self.sent if m["bot"] == bid]

    def conflicts_for(self, bot: str) -> int:
        bid = self.bot_id(bot)
        return sum(1 for b, _ in self.conflicts if b == bid)

    def polling(self, bot: str) -> bool:
        """Whether a getUpdates long poll of this bot is waiting right now."""
        return self.bot_id(bot) in self._polls

    # --- the Bot API -----------------------------------------------------------------------------

    def _event(self, bid: str) -> asyncio.Event:
        return self._arrived.setdefault(bid, asyncio.Event())

    async def _release_polls(self, app: web.Application) -> None:
        # Shutting down: end every long poll now instead of waiting out its timeout.
        self._closing = True
        for ev in self._arrived.values():
            ev.set()

    @staticmethod
    async def _params(request: web.Request) -> dict:
        params: dict = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                body = await request.json()
                if isinstance(body, dict):
                    params.update(body)
            else:
                params.update(dict(await request.post()))
        return params

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
            return await self._get_updates(request, self.bot_id(token))
        if method == "sendMessage":
            params = await self._params(request)
            bid = self.bot_id(token)
            self.sent.append({"bot": bid, "chat_id": params.get("chat_id"), "text": params.get("text", "")})
            return web.json_response(
                {
                    "ok": True,
                    "result": {
                        "message_id": len(self.sent),
                        "date": int(time.time()),
                        "chat": {"id": int(str(params.get("chat_id") or 0)), "type": "private"},
                        "from": {"id": int(bid), "is_bot": True, "first_name": username},
                        "text": params.get("text", ""),
                    },
                }
            )
        return web.json_response({"ok": True, "result": True})

    async def _get_updates(self, request: web.Request, bid: str) -> web.Response:
        params = await self._params(request)
        self.polls.append((bid, params))
        self.poll_times.append(time.monotonic())
        script = self.scripted.get(bid)
        if script:
            status, parameters = script.pop(0)
            body: dict = {"ok": False, "error_code": status, "description": f"scripted {status}"}
            if parameters:
                body["parameters"] = parameters
            return web.json_response(body, status=status)
        offset = int(params.get("offset") or 0)
        limit = max(1, min(100, int(params.get("limit") or 100)))
        timeout = max(0.0, min(float(params.get("timeout") or 0), self.max_poll_s))
        queue = self.pending.setdefault(bid, [])
        if offset > 0:  # confirms every update below it: Telegram forgets them
            queue[:] = [u for u in queue if u["update_id"] >= offset]
        elif offset < 0:
            del queue[: max(0, len(queue) + offset)]
        # A newer call ends an older one of the same bot, as on Telegram.
        older = self._polls.get(bid)
        if older is not None:
            older.terminated = True
            older.done.set()
            if older.request.transport is not None and not older.request.transport.is_closing():
                self.conflicts.append((bid, time.time()))
        poll = _Poll(request)
        self._polls[bid] = poll
        try:
            deadline = time.monotonic() + timeout
            arrived = self._event(bid)
            while True:
                arrived.clear()  # before looking at the queue: an update injected after it wakes us
                left = deadline - time.monotonic()
                if queue or poll.terminated or self._closing or left <= 0:
                    break
                waiters = [asyncio.ensure_future(arrived.wait()), asyncio.ensure_future(poll.done.wait())]
                _, rest = await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for w in rest:
                    w.cancel()
        finally:
            if self._polls.get(bid) is poll:
                del self._polls[bid]
        if poll.terminated:
            return web.json_response({"ok": False, "error_code": 409, "description": CONFLICT}, status=409)
        result = queue[:limit]
        tag = request.headers.get("User-Agent", "")
        self.delivered.extend((bid, u["update_id"], tag) for u in result)
        return web.json_response({"ok": True, "result": result})


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
