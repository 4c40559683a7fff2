"""API keys, token buckets and admission caps, on their own (the HTTP side is in test_hardening)."""

import math

import pytest

from server.guard.keys import ApiKeys, AuthError, key_id, read_keys_file
from server.guard.rate_limit import Admission, Limits, OverloadedError, RateLimitError, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_accept_only_bearer_of_a_known_key():
    keys = ApiKeys(["sk-alpha", "sk-beta"])
    assert keys.enabled
    assert keys.authenticate("Bearer sk-beta") == key_id("sk-beta")
    assert keys.authenticate("bearer   sk-alpha") == key_id("sk-alpha")
    for bad in (None, "", "Bearer", "Bearer ", "Basic sk-alpha", "sk-alpha", "Bearer sk-alph", "Bearer sk-alpha x"):
        with pytest.raises(AuthError):
            keys.authenticate(bad)
    assert not ApiKeys([]).enabled
    assert "sk-alpha" not in key_id("sk-alpha")


def test_keys_file(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# team keys\nsk-one\n\n  sk-two  \n")
    assert read_keys_file(f) == ["sk-one", "sk-two"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_keys_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="cannot read"):
        read_keys_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError):
        ApiKeys(["has space"])


def test_token_bucket_refills_per_minute():
    clock = FakeClock()
    bucket = TokenBucket(60, clock=clock)
    assert bucket.wait_time(60) == 0
    bucket.take(60)
    assert bucket.wait_time(1) == pytest.approx(1.0)
    clock.now += 30
    assert bucket.wait_time(30) == pytest.approx(0.0)
    assert bucket.wait_time(31) == pytest.approx(1.0)
    assert math.isinf(bucket.wait_time(61))
    bucket.give_back(1000)
    assert bucket.tokens == 60


def test_requests_per_minute_and_retry_after():
    clock = FakeClock()
    adm = Admission(Limits(requests_per_minute=2), clock=clock)
    adm.check_request("a")
    adm.check_request("a")
    with pytest.raises(RateLimitError) as err:
        adm.check_request("a")
    assert err.value.retry_after == 30
    adm.check_request("b")  # clients are independent
    clock.now += 30
    adm.check_request("a")


def test_tokens_per_minute_reserve_then_settle():
    clock = FakeClock()
    adm = Admission(Limits(tokens_per_minute=100), clock=clock)
    adm.check_tokens("a", 80)
    with pytest.raises(RateLimitError):
        adm.check_tokens("a", 30)
    adm.settle_tokens("a", reserved=80, used=30)  # 50 come back
    adm.check_tokens("a", 60)
    adm.settle_tokens("a", reserved=60, used=90)  # no cap was sent: the extra 30 are charged after the fact
    with pytest.raises(RateLimitError) as err:
        adm.check_tokens("a", 1)
    assert err.value.retry_after == 13  # 100 - 80 + 50 - 60 - 30 = -20: 21 tokens to wait for at 100/min = 12.6 s
    with pytest.raises(RateLimitError, match="Request too large") as err:
        adm.check_tokens("b", 101)
    assert err.value.retry_after is None  # waiting cannot help


def test_idle_clients_are_forgotten_so_memory_stays_bounded():
    clock = FakeClock()
    adm = Admission(Limits(requests_per_minute=10, tokens_per_minute=100), clock=clock)
    for i in range(20_000):
        adm.check_request(f"addr-{i}")
        clock.now += 0.01  # 200 s in all: each bucket refills within a minute
    assert len(adm._requests) < 12_000
    adm.enter("busy")
    adm.check_tokens("busy", 100)
    clock.now += 120
    adm._sweep()
    assert set(adm._requests) == set() and set(adm._tokens) == {"busy"}  # in flight: kept


def test_concurrency_cap_and_bounded_waiting_room():
    adm = Admission(Limits(max_concurrent_per_client=2, max_pending=3))
    adm.enter("a")
    adm.enter("a")
    with pytest.raises(RateLimitError):
        adm.enter("a")
    adm.enter("b")
    with pytest.raises(OverloadedError):
        adm.enter("c")
    adm.leave("a")
    adm.enter("c")
    for client in ("a", "b", "c"):
        adm.leave(client)
    assert adm.pending == 0
    with pytest.raises(RuntimeError, match="without a matching enter"):
        adm.leave("a")
    adm.enter("a")
    adm.enter("a")
