import math

import pytest

from broker.ratelimit import RateLimiter

T0 = 1_700_000_000.0


def test_burst_then_refused():
    rl = RateLimiter(burst=5, per_second=1)
    assert [rl.allow("u", T0) for _ in range(7)] == [True] * 5 + [False] * 2


def test_refill():
    rl = RateLimiter(burst=3, per_second=2)
    for _ in range(3):
        assert rl.allow("u", T0)
    assert not rl.allow("u", T0)
    assert not rl.allow("u", T0 + 0.4)  # 0.8 token
    assert rl.allow("u", T0 + 0.5)      # 1.0 token
    assert not rl.allow("u", T0 + 0.5)


def test_refill_capped_at_burst():
    rl = RateLimiter(burst=2, per_second=10)
    assert rl.allow("u", T0)
    # A long quiet time gives back no more than the burst.
    assert [rl.allow("u", T0 + 3600) for _ in range(3)] == [True, True, False]


def test_refused_requests_consume_nothing():
    rl = RateLimiter(burst=1, per_second=1)
    assert rl.allow("u", T0)
    for i in range(1, 10):
        assert not rl.allow("u", T0 + i * 0.1)
    assert rl.allow("u", T0 + 1.0)


def test_keys_independent():
    rl = RateLimiter(burst=2, per_second=0)
    assert rl.allow(33, T0) and rl.allow(33, T0)
    assert not rl.allow(33, T0)
    assert rl.allow(1000, T0)
    assert rl.allow("33", T0)  # a different key, despite printing alike


def test_no_refill_when_rate_zero():
    rl = RateLimiter(burst=2, per_second=0)
    assert rl.allow("u", T0) and rl.allow("u", T0)
    assert not rl.allow("u", T0 + 10 * 365 * 86400)


@pytest.mark.parametrize("burst", [0, 0.5, 0.999])
def test_burst_below_one_refuses_everything(burst):
    rl = RateLimiter(burst=burst, per_second=100)
    assert not any(rl.allow("u", T0 + i) for i in range(10))
    assert len(rl) == 0


def test_fractional_burst():
    rl = RateLimiter(burst=1.5, per_second=0)
    assert rl.allow("u", T0)
    assert not rl.allow("u", T0)


def test_clock_backwards_gives_nothing_and_takes_nothing():
    rl = RateLimiter(burst=2, per_second=1)
    assert rl.allow("u", T0) and rl.allow("u", T0)
    assert not rl.allow("u", T0 - 3600)
    assert math.isclose(rl.tokens("u", T0 - 3600), 0.0)
    assert rl.allow("u", T0 - 3600 + 1)


def test_tokens_does_not_consume():
    rl = RateLimiter(burst=2, per_second=0)
    assert rl.tokens("u", T0) == 2
    assert rl.tokens("u", T0) == 2
    rl.allow("u", T0)
    assert rl.tokens("u", T0) == 1


def test_memory_bound_holds():
    rl = RateLimiter(burst=5, per_second=0, max_keys=100)
    for i in range(10_000):
        rl.allow(i, T0 + i)
    assert len(rl) <= 100


def test_full_buckets_are_dropped_first():
    rl = RateLimiter(burst=2, per_second=1, max_keys=3)
    rl.allow("a", T0)
    rl.allow("a", T0)       # a: empty
    rl.allow("b", T0)       # b: 1 token, full again at T0+1
    rl.allow("c", T0 + 5)   # c: 1 token
    rl.allow("a", T0 + 5.5)  # a refilled to 2, now 1; most recently used
    # At T0+10 every bucket is full again; a new key makes room by dropping them all.
    assert rl.allow("d", T0 + 10)
    assert len(rl) == 1


def test_eviction_forgives_the_fullest_not_the_most_limited():
    rl = RateLimiter(burst=3, per_second=0, max_keys=3)
    for _ in range(3):
        rl.allow("abuser", T0)           # 0 tokens left
    rl.allow("light", T0)                # 2 tokens left
    rl.allow("medium", T0)
    rl.allow("medium", T0)               # 1 token left
    assert rl.allow("new", T0)
    assert len(rl) == 3
    assert rl.tokens("abuser", T0) == 0   # still limited
    assert rl.tokens("medium", T0) == 1
    assert rl.tokens("light", T0) == 3    # evicted: back to a full bucket


def test_eviction_tie_goes_to_least_recently_used():
    rl = RateLimiter(burst=3, per_second=0, max_keys=2)
    rl.allow("old", T0)
    rl.allow("recent", T0 + 1)
    rl.allow("old", T0 + 2)     # old used again: now 1 token, recent has 2
    rl.allow("recent", T0 + 3)  # recent: 1 token, and most recently used
    rl.allow("new", T0 + 4)
    assert rl.tokens("old", T0 + 4) == 3      # evicted
    assert rl.tokens("recent", T0 + 4) == 1


@pytest.mark.parametrize("burst,rate,exc", [
    (-1, 1, ValueError), (1, -1, ValueError), (math.inf, 1, ValueError), (1, math.nan, ValueError),
    ("1", 1, TypeError), (True, 1, TypeError),
])
def test_rejects_bad_parameters(burst, rate, exc):
    with pytest.raises(exc):
        RateLimiter(burst, rate)


def test_rejects_bad_max_keys():
    with pytest.raises(ValueError):
        RateLimiter(1, 1, max_keys=0)
    with pytest.raises(TypeError):
        RateLimiter(1, 1, max_keys=1.5)
