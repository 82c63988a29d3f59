import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.crypto import DecryptionError, KeyRing


def test_round_trip_binds_context():
    ring = KeyRing.from_spec(KeyRing.new_key_spec("a"))
    sealed = ring.encrypt("123456:secret-token-value", "instance:alice:bot_token")
    assert "secret" not in sealed and sealed.startswith("zk1.a.")
    assert ring.decrypt(sealed, "instance:alice:bot_token") == "123456:secret-token-value"
    # The same ciphertext copied to another user's record does not open.
    with pytest.raises(DecryptionError):
        ring.decrypt(sealed, "instance:bob:bot_token")


def test_old_key_still_decrypts_after_rotation_and_reseal_moves_to_new_key():
    old, new = KeyRing.new_key_spec("old"), KeyRing.new_key_spec("new")
    sealed = KeyRing.from_spec(old).encrypt("pw", "ctx")
    rotated = KeyRing.from_spec(f"{new},{old}")
    assert rotated.decrypt(sealed, "ctx") == "pw"
    resealed = rotated.reseal(sealed, "ctx")
    assert resealed is not None and rotated.key_id(resealed) == "new"
    assert rotated.reseal(resealed, "ctx") is None
    # Once the old key is retired, only the resealed value opens.
    new_only = KeyRing.from_spec(new)
    assert new_only.decrypt(resealed, "ctx") == "pw"
    with pytest.raises(DecryptionError, match="unknown key id"):
        new_only.decrypt(sealed, "ctx")


@pytest.mark.parametrize("flip", [10, 20, -1])
def test_tampering_is_detected(flip):
    ring = KeyRing.from_spec(KeyRing.new_key_spec("a"))
    sealed = ring.encrypt("value", "ctx")
    chars = list(sealed)
    chars[flip] = "A" if chars[flip] != "A" else "B"
    with pytest.raises(DecryptionError):
        ring.decrypt("".join(chars), "ctx")


def test_garbage_is_refused():
    ring = KeyRing.from_spec(KeyRing.new_key_spec("a"))
    for bad in ["", "plain", "zk1.a", "zk1.zz.AAAA", "zk2.a.AAAA"]:
        with pytest.raises(DecryptionError):
            ring.decrypt(bad, "ctx")


@given(st.text(max_size=500), st.text(max_size=50))
def test_round_trip_any_text(value, ctx):
    ring = KeyRing.from_spec("k:" + "A" * 43)
    assert ring.decrypt(ring.encrypt(value, ctx), ctx) == value
