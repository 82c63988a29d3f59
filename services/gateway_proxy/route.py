"""Where one user's gateway answers (the routing table's entries), and why there is none."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    user_id: str
    host: str
    port: int
    instance_id: str


class NoRoute(Exception):
    def __init__(self, state: str | None) -> None:
        super().__init__(state or "absent")
        self.state = state
