"""Checks a bot token with the Telegram Bot API's getMe (base URL is a setting)."""

from __future__ import annotations

import httpx

from shared.validation import check_bot_token


class InvalidBotToken(Exception):
    pass


class TelegramUnavailable(Exception):
    pass


class TelegramClient:
    def __init__(self, api_base: str, timeout: float = 10.0) -> None:
        self.api_base = api_base.rstrip("/")
        self.http = httpx.AsyncClient(timeout=timeout)

    async def get_me(self, token: str) -> str:
        """Returns the bot's username, or raises InvalidBotToken / TelegramUnavailable."""
        check_bot_token(token)
        try:
            r = await self.http.get(f"{self.api_base}/bot{token}/getMe")
        except httpx.HTTPError as e:
            # The exception text holds the URL, which holds the token: keep only its type.
            raise TelegramUnavailable(f"Telegram API unreachable ({type(e).__name__})") from None
        if r.status_code in (401, 403, 404):
            raise InvalidBotToken("Telegram refused the bot token")
        if r.status_code >= 500 or r.status_code == 429:
            raise TelegramUnavailable(f"Telegram API answered {r.status_code}")
        try:
            body = r.json()
        except ValueError:
            raise TelegramUnavailable("Telegram API answered with non-JSON") from None
        result = body.get("result") or {}
        if not body.get("ok") or not result.get("is_bot"):
            raise InvalidBotToken("the token does not belong to a bot")
        return str(result.get("username") or "")

    async def close(self) -> None:
        await self.http.aclose()
