"""Settings refuse what the services could not run, at start and with the setting's name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.provisioner.base import _bytes
from shared.settings import ZakiSettings


@pytest.mark.parametrize("bad", ["2 gigs", "lots", "", "-1g", "0"])
def test_a_memory_size_docker_cannot_read_is_refused_with_the_settings_name(bad: str) -> None:
    for field in ("gateway_memory", "suspend_swap_floor"):
        with pytest.raises(ValidationError, match=field):
            ZakiSettings(**{field: bad})


def test_sizes_are_read_as_docker_reads_them() -> None:
    s = ZakiSettings(gateway_memory=" 1536m ", suspend_swap_floor="64m")
    assert (_bytes(s.gateway_memory), _bytes(s.suspend_swap_floor)) == (1536 << 20, 64 << 20)
    assert _bytes("2g") == 2 << 30 and _bytes("1.5g") == 3 << 29 and _bytes("4096") == 4096
