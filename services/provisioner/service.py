"""The provisioner's domain logic: events in, gateways and outcomes out.

A facade over the layers (``base`` -> ``lifecycle`` -> ``commands`` -> ``reconcile``):
``Provisioner`` is the whole service as ``app.py`` drives it. The runtime is the only
thing that touches Docker; the store's conditional updates are the only way an instance
changes state.
"""

from __future__ import annotations

from services.provisioner.base import Phase, ProvisionError, Retry, _bytes, _ctx
from services.provisioner.reconcile import Reconciler
from services.provisioner.suspend import Suspension
from shared.crypto import KeyRing
from shared.store import Store

__all__ = ["Phase", "ProvisionError", "Provisioner", "Retry", "_bytes", "_ctx", "rotate_instance_secrets"]


class Provisioner(Suspension, Reconciler):
    """Commands, lifecycle, idle suspend/wake and reconcile of the gateways of one Docker host."""


SECRET_FIELDS = ("bot_token", "gateway_password", "provider_key", "broker_key")


async def rotate_instance_secrets(store: Store, keyring: KeyRing) -> int:
    """Re-encrypts every instance secret under the primary key; returns how many records changed.

    Each record is rewritten on its own (a versioned single-document write), so running
    gateways are untouched and a concurrent provisioner never loses an update.
    """
    changed = 0
    for doc in await store.list_instances():
        fields = {}
        for name in SECRET_FIELDS:
            sealed = doc.get(f"{name}_enc")
            if sealed:
                new = keyring.reseal(sealed, _ctx(doc["_id"], name))
                if new is not None:
                    fields[f"{name}_enc"] = new
        if fields and await store.update_instance(doc["_id"], fields, doc["instance_id"]):
            changed += 1
    return changed
