"""The settings that point a platform at local fakes of Telegram and a model provider
(zaki/fakes.py): one place for the demo (`zaki up --demo`), the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping


def with_entry(entries: str | None, entry: str) -> str:
    """A comma-separated setting with one more entry."""
    return ",".join([*(e for e in (entries or "").split(",") if e.strip()), entry])


def fake_world_env(
    host: str,
    telegram_port: int,
    llm_port: int,
    broker_port: int,
    llm_api_key: str,
    operator_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """*host* is this machine's address on the Docker bridge, where the fakes and the broker
    listen; gateways reach it as host.docker.internal. The fake provider is plain http on a
    private address, which the broker calls only when the operator names it: its host:port is
    added to whatever *operator_env* already allows."""
    operator_env = operator_env or {}
    provider = f"{host}:{llm_port}"
    return {
        "ZAKI_TELEGRAM_API_BASE": f"http://{host}:{telegram_port}",
        "ZAKI_TELEGRAM_API_BASE_FOR_GATEWAYS": f"http://host.docker.internal:{telegram_port}",
        "ZAKI_TELEGRAM_PRIVATE_NETWORK": "true",
        "ZAKI_LLM_BASE_URL": f"http://{provider}/v1",  # as the broker reaches it
        "ZAKI_LLM_API_KEY": llm_api_key,
        "ZAKI_BROKER_HTTP_HOSTS": with_entry(operator_env.get("ZAKI_BROKER_HTTP_HOSTS"), provider),
        "ZAKI_BROKER_PRIVATE_HOSTS": with_entry(operator_env.get("ZAKI_BROKER_PRIVATE_HOSTS"), provider),
        "ZAKI_BROKER_HOST": host,
        "ZAKI_BROKER_PORT": str(broker_port),
        "ZAKI_BROKER_URL_FOR_GATEWAYS": f"http://host.docker.internal:{broker_port}",
        "ZAKI_DEFAULT_MODEL": "zaki/echo-1",
    }
