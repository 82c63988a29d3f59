"""Issue 13, item 6: budgets cannot be dodged by hiding usage or by calling in parallel."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from services.llm_broker.budget import BudgetPolicy, UsageLedger, Verdict
from services.llm_broker.requests import prepare
from services.llm_broker.reservations import Reservation
from services.llm_broker.usage import UsageMeter
from shared.store import Store
from tests.conftest import broker_url, eventually, new_user
from tests.test_broker import chat_body, fake_instance, sse

# --- every generated delta kind is estimated when a stream hides its usage -----------------------


def _meter(*events: dict) -> int:
    m = UsageMeter(streaming=True)
    m.feed(sse(*events))
    u = m.finish()
    assert not u.reported
    return u.completion_tokens


@pytest.mark.parametrize(
    "event",
    [
        {"choices": [{"delta": {"content": "x" * 40}}]},
        {"choices": [{"delta": {"reasoning_content": "x" * 40}}]},
        {"choices": [{"delta": {"reasoning": "x" * 40}}]},
        {"choices": [{"delta": {"refusal": "x" * 40}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "x" * 40}}]}}]},
        {"choices": [{"delta": {"function_call": {"arguments": "x" * 40}}}]},
        {"choices": [{"text": "x" * 40}]},  # legacy completions
        {"type": "response.output_text.delta", "delta": "x" * 40},
        {"type": "response.reasoning_text.delta", "delta": "x" * 40},
        {"type": "response.reasoning_summary_text.delta", "delta": "x" * 40},
        {"type": "response.function_call_arguments.delta", "delta": "x" * 40},
        {"type": "response.refusal.delta", "delta": "x" * 40},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x" * 40}},
        {"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "x" * 40}},
        {"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": "x" * 40}},
    ],
)
def test_every_generated_delta_kind_is_estimated(event):
    assert _meter(event) == 10


def test_a_json_answer_without_usage_is_estimated_from_its_size():
    m = UsageMeter(streaming=False)
    body = json.dumps({"choices": [{"message": {"content": "x" * 400}}]}).encode()
    m.feed(body)
    assert m.finish().completion_tokens == math.ceil(len(body) / 4)


# --- what the broker asks of a provider -------------------------------------------------------------


def test_prepare_asks_for_usage_on_openai_streams_only():
    body = json.dumps({"model": "m", "stream": True, "messages": [], "max_tokens": 50}).encode()
    p = prepare("openai-completions", "chat/completions", body, 4096, True)
    assert json.loads(p.body)["stream_options"] == {"include_usage": True} and p.asked_usage
    assert p.reserve == math.ceil(len(body) / 4) + 50
    kept = json.dumps({"stream": True, "stream_options": {"include_usage": True}}).encode()
    assert prepare("openai-completions", "chat/completions", kept, 4096, True).body == kept
    forced = json.dumps({"stream": True, "stream_options": {"include_usage": False, "x": 1}}).encode()
    assert json.loads(prepare("openai-responses", "chat/completions", forced, 0, True).body)[
        "stream_options"
    ] == {
        "include_usage": True,
        "x": 1,
    }
    for api, rest, b in (
        ("openai-completions", "chat/completions", json.dumps({"stream": False}).encode()),
        ("openai-responses", "responses", json.dumps({"stream": True}).encode()),  # reports usage itself
        ("anthropic-messages", "v1/messages", json.dumps({"stream": True, "max_tokens": 7}).encode()),
    ):
        assert prepare(api, rest, b, 4096, True).body == b
    assert prepare("anthropic-messages", "v1/messages", b, 4096, True).reserve == math.ceil(len(b) / 4) + 7
    assert prepare("openai-completions", "chat/completions", b"not json", 100, True).reserve == 2 + 100
    assert prepare("openai-completions", "embeddings", b'{"input": "abcd"}', 100, True).reserve == 5


async def test_the_provider_is_asked_for_usage_and_a_silent_stream_is_counted(
    broker, store, service_env, keyring_spec, fakes, host_net
):
    user, cred = await fake_instance(store, keyring_spec, host_net)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            f"{broker_url(service_env)}/p/zaki/chat/completions",
            headers={"Authorization": f"Bearer {cred}"},
            json=chat_body("silent please", stream=True),
        )
    assert r.status_code == 200 and "reasoning_content" in r.text
    assert fakes.llm.calls[-1]["stream_options"] == {"include_usage": True}
    assert fakes.llm.calls[-1]["messages"][0]["content"] == "silent please"

    async def counted():
        doc = await store.usage.find_one({"user_id": user})
        return doc if doc and doc.get("completion_tokens") else None

    doc = await eventually(counted, timeout=10)
    # 400 characters of reasoning and 401 of tool call (name and arguments): about 200 tokens.
    assert doc["completion_tokens"] == math.ceil(801 / 4), doc


# --- reservations: calls in flight hold their estimate ---------------------------------------------


async def test_a_parallel_burst_overshoots_a_hard_limit_by_at_most_one_reservation(
    broker, store, service_env, keyring_spec, host_net
):
    limit = 20
    user, cred = await fake_instance(store, keyring_spec, host_net, budget={"tokens_per_day": limit})
    body = {**chat_body("slow a b", stream=True), "max_tokens": 10}
    reservation = math.ceil(len(json.dumps(body).encode()) / 4) + 10  # its prompt's estimate and max_tokens

    async def one(http: httpx.AsyncClient) -> int:
        r = await http.post(
            f"{broker_url(service_env)}/p/zaki/chat/completions",
            headers={"Authorization": f"Bearer {cred}"},
            json=body,
        )
        return r.status_code

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=20)) as http:
        codes = await asyncio.gather(*(one(http) for _ in range(12)))
        assert set(codes) <= {200, 429} and codes.count(200) >= 1, codes

        async def recorded():
            doc = await store.usage.find_one({"user_id": user})
            return doc if doc and doc["requests"] == codes.count(200) else None

        doc = await eventually(recorded, timeout=10)
        print(
            f"BURST 12 calls, limit {limit}, reservation {reservation}: {codes.count(200)} answered, "
            f"{codes.count(429)} refused, {doc['tokens']} tokens used"
        )
        # Each answered call uses 8 tokens; all 12 would have been 96 against a limit of 20.
        assert doc["tokens"] <= limit + reservation, (codes, doc)
        assert codes.count(429) >= 12 - math.ceil(limit / 8), codes
        # The reservations of finished calls were given back: the next call passes.
        r = await http.post(
            f"{broker_url(service_env)}/p/zaki/chat/completions",
            headers={"Authorization": f"Bearer {cred}"},
            json=chat_body("again"),
        )
        assert r.status_code == 200, r.text


async def test_reservations_hold_across_broker_processes(stack):
    """Two ledgers on two connections stand for two broker processes on one store."""
    stores = [Store(stack.mongo.address, "zaki") for _ in range(2)]
    ledgers = [UsageLedger(s) for s in stores]
    for ledger in ledgers:
        await ledger.reservations.ensure_indexes()
        ledger.start()
    try:
        user, limit, size = new_user("r"), 95, 10
        policy = BudgetPolicy(tokens_per_day=limit)
        results = await asyncio.gather(*(ledgers[i % 2].reserve(user, policy, size) for i in range(30)))
        held = [r for r in results if isinstance(r, Reservation)]
        refused = [r for r in results if isinstance(r, Verdict)]
        assert len(held) + len(refused) == 30 and refused
        # Admitted while the reservations ahead stayed under the limit: at most one over it.
        assert 1 <= len(held) <= math.ceil(limit / size), len(held)
        assert sum(r.tokens for r in held) <= limit + size
        assert len({r.id for r in held}) == len(held)
        # A refusal names the limit and asks to retry soon (the calls in flight may use less).
        assert refused[0].retry_after_s <= 5 and refused[0].allowed == limit

        # Each process counts what its calls used (3 tokens each) and settles the reservations:
        # what is held goes away, what was used stays.
        for i, r in enumerate(held):
            await ledgers[i % 2].record_durably(user, 1, 2, reservation=r)
        coll = stores[0].db["budget_reservations"]

        async def all_settled() -> bool:
            return await coll.count_documents({"user_id": user}) == 0

        await eventually(all_settled, timeout=5)
        ledgers[0].totals.clear()
        again = await ledgers[0].reserve(user, policy, size)
        assert isinstance(again, Reservation), again
        await ledgers[0].release(again)
    finally:
        for ledger, s in zip(ledgers, stores, strict=True):
            await ledger.stop()
            await s.close()


async def test_a_hard_limit_fails_closed_when_the_store_is_down():
    """The broker in this process, its store at a loopback port where nothing listens."""
    from aiohttp.test_utils import TestServer
    from pymongo import AsyncMongoClient

    from services.llm_broker.app import LLMBroker
    from services.llm_broker.directory import BrokerClient, Directory
    from shared.crypto import KeyRing, new_broker_credential
    from shared.settings import ZakiSettings
    from zaki.stack import free_port

    store = Store(f"mongodb://127.0.0.1:{free_port()}/", "zaki")
    await store.client.close()
    store.client = AsyncMongoClient(f"mongodb://127.0.0.1:{free_port()}/", serverSelectionTimeoutMS=300)
    store.db = store.client["zaki"]
    store.usage = store.db["usage"]

    class OneInstance(Directory):
        async def client(self, credential: str) -> BrokerClient | None:
            return BrokerClient(
                user_id=new_user("down"),
                instance_id="i1",
                state="running",
                subnet=None,
                budget={"tokens_per_day": 1000},
                # Never called: the refusal comes first (and a public name is not resolved before).
                own_provider={
                    "name": "mine",
                    "base_url": "https://api.example.com/v1",
                    "api": "openai-completions",
                },
                own_key_enc=None,
            )

    async def publish(*_args) -> None:
        return None

    broker = LLMBroker(
        ZakiSettings(broker_check_source=False),
        OneInstance(store, KeyRing.from_spec(KeyRing.new_key_spec("t"))),
        UsageLedger(store),
        publish,
    )
    async with TestServer(broker.build(), host="127.0.0.1") as server:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(
                str(server.make_url("/p/mine/chat/completions")),
                headers={"Authorization": f"Bearer {new_broker_credential()}"},
                json=chat_body("x"),
            )
    assert r.status_code == 503 and r.json()["error"]["code"] == "budget_unavailable", r.text
    assert r.headers["Retry-After"] == "2"
    await store.close()


async def test_in_process_reservations_hold_a_burst_too(store):
    ledger = UsageLedger(store, shared_reservations=False)
    ledger.start()
    try:
        user, limit, size = new_user("m"), 95, 10
        results = await asyncio.gather(
            *(ledger.reserve(user, BudgetPolicy(tokens_per_day=limit), size) for _ in range(30))
        )
        held = [r for r in results if isinstance(r, Reservation)]
        assert len(held) == math.ceil(limit / size)  # exactly: one process sees all of them
        for r in held:
            await ledger.record_durably(user, 1, 2, reservation=r)
        await eventually(lambda: not ledger.reservations._open, timeout=5)
        assert isinstance(await ledger.reserve(user, BudgetPolicy(tokens_per_day=limit), size), Reservation)
    finally:
        await ledger.stop()
