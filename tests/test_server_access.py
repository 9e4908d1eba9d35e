"""Access control: API keys, rate limits, client signatures (no server, no engine)."""
from __future__ import annotations

import json
import logging
import math

import pytest

from tokenmill.server.access import AccessController
from tokenmill.server.api_keys import KeyInfo, KeyStore
from tokenmill.server.rate_limit import RateLimiter, TokenBucket
from tokenmill.server.refusal import Refusal
from tokenmill.server.signature import SignaturePolicy

SECRET = "sk-very-secret-123"


def write_keys(tmp_path, keys, name="keys.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"keys": keys}) if not isinstance(keys, str) else keys)
    return str(path)


# --- key store --------------------------------------------------------------------------------

def test_key_file_parsing(tmp_path):
    path = write_keys(tmp_path, [
        {"id": "team-a", "key": "sk-a", "requests_per_minute": 60, "tokens_per_minute": 100000,
         "signature": {"required_headers": ["X-Stainless-Lang"], "action": "block"}},
        {"id": "team-b", "key": "sk-b"}])
    store = KeyStore.from_config("sk-cli", path)
    assert store.enabled and len(store) == 3
    a = store.authenticate("Bearer sk-a")
    assert (a.key_id, a.requests_per_minute, a.tokens_per_minute) == ("team-a", 60, 100000)
    assert a.signature.required_headers == ["x-stainless-lang"] and a.signature.action == "block"
    b = store.authenticate("bearer sk-b")
    assert b.key_id == "team-b" and b.requests_per_minute is None and b.signature is None
    assert store.authenticate("Bearer sk-cli").key_id == "default"
    assert SECRET not in repr(a)


@pytest.mark.parametrize("keys, match", [
    ([{"id": "a", "key": "k1"}, {"id": "a", "key": "k2"}], "duplicate API key id 'a'"),
    ([{"id": "a", "key": "k1"}, {"id": "b", "key": "k1"}], "already used by 'a'"),
    ([{"key": "k1"}], "'id' is required"),
    ([{"id": "a"}], r"entry 0 \(id 'a'\): 'key' is required"),
    ([{"id": 3, "key": "k1"}], "'id' is required and must be a non-empty string"),
    ([{"id": "a", "key": ""}], "'key' is required"),
    ([{"id": "a", "key": "k", "requests_per_minute": 0}], "requests_per_minute must be a positive"),
    ([{"id": "a", "key": "k", "tokens_per_minute": -5}], "tokens_per_minute must be a positive"),
    ([{"id": "a", "key": "k", "tokens_per_minute": "100"}], "tokens_per_minute must be a positive"),
    ([{"id": "a", "key": "k", "requests_per_minute": True}], "requests_per_minute must be a positive"),
    ([{"id": "a", "key": "k", "rpm": 5}], "unknown fields rpm"),
    ([{"id": "a", "key": "k", "signature": {"action": "deny"}}], "action must be 'log' or 'block'"),
    ([{"id": "a", "key": "k", "signature": {"user_agent_patterns": ["("]}}], r"bad regex '\('"),
    (["not an object"], "entry 0: must be a JSON object"),
    ("not json", "cannot read API keys file"),
    ('{"nokeys": []}', "must be a JSON object with a 'keys' list"),
])
def test_key_file_validation(tmp_path, keys, match):
    path = write_keys(tmp_path, keys)
    with pytest.raises(ValueError, match=match) as exc:
        KeyStore.from_config(None, path)
    assert path in str(exc.value)


def test_key_file_errors_name_second_entry(tmp_path):
    path = write_keys(tmp_path, [{"id": "a", "key": "k1"}, {"id": "b", "key": "k2", "tokens_per_minute": 0}])
    with pytest.raises(ValueError, match=r"entry 1 \(id 'b'\)"):
        KeyStore.from_config(None, path)


def test_missing_key_file_and_cli_id_collision(tmp_path):
    with pytest.raises(ValueError, match="cannot read API keys file"):
        KeyStore.from_config(None, str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="duplicate API key id 'default'"):
        KeyStore.from_config("k0", write_keys(tmp_path, [{"id": "default", "key": "k1"}]))


def test_auth_disabled():
    store = KeyStore.from_config(None, None)
    assert not store.enabled
    assert store.authenticate(None) is None
    assert store.authenticate("Bearer whatever") is None


@pytest.mark.parametrize("header, fragment", [
    (None, "missing Authorization"), ("", "missing Authorization"),
    (SECRET, "malformed"), (f"Basic {SECRET}", "malformed"), ("Bearer ", "malformed"),
    ("Bearer " + SECRET + "x", "invalid API key"), ("Bearer sk-other", "invalid API key"),
])
def test_401(header, fragment):
    store = KeyStore.from_config(SECRET, None)
    with pytest.raises(Refusal) as exc:
        store.authenticate(header)
    r = exc.value
    assert (r.status, r.reason, r.code, r.err_type) == (401, "auth", "invalid_api_key", "authentication_error")
    assert fragment in r.message
    assert SECRET not in r.message and "sk-other" not in r.message
    assert store.authenticate(f"Bearer {SECRET}").key_id == "default"


# --- token bucket -----------------------------------------------------------------------------

def test_token_bucket_refill_arithmetic():
    b = TokenBucket(60, now=100.0)  # 1 per second, burst 60
    assert b.try_take(60, now=100.0) == 0.0
    assert b.try_take(1, now=100.0) == pytest.approx(1.0)
    assert b.try_take(5, now=102.0) == pytest.approx(3.0)  # 2 refilled, 3 more seconds
    assert b.tokens == pytest.approx(2.0)  # the refused take consumed nothing
    assert b.try_take(2, now=102.0) == 0.0
    assert b.try_take(1, now=1000.0) == 0.0 and b.tokens == pytest.approx(59.0)  # capped at capacity
    assert b.try_take(61, now=2000.0) == math.inf
    assert b.try_take(1, now=50.0) == 0.0 and b.tokens == pytest.approx(58.0)  # clock going back adds nothing


# --- rate limiter -----------------------------------------------------------------------------

def test_requests_per_minute_429():
    key = KeyInfo("team-a", requests_per_minute=2)
    rl = RateLimiter()
    rl.check(key, 10, now=0.0)
    rl.check(key, 10, now=0.0)
    with pytest.raises(Refusal) as exc:
        rl.check(key, 10, now=10.0)  # 1/30 per s: 1/3 refilled after 10s, 2/3 missing = 20s
    r = exc.value
    assert (r.status, r.reason, r.code, r.err_type) == (429, "rate_limit", "rate_limit_exceeded", "rate_limit_error")
    assert r.retry_after == 20.0
    assert "requests per minute" in r.message and "tokens per minute" not in r.message and "'team-a'" in r.message
    rl.check(key, 10, now=30.0)


def test_tokens_per_minute_429_retry_after_is_ceiled():
    key = KeyInfo("team-b", tokens_per_minute=600)  # 10 tokens per second
    rl = RateLimiter()
    rl.check(key, 595, now=0.0)
    with pytest.raises(Refusal) as exc:
        rl.check(key, 20, now=0.0)  # 5 left, 15 missing = 1.5s
    assert exc.value.retry_after == 2.0
    assert "tokens per minute" in exc.value.message and "'team-b'" in exc.value.message
    rl.check(key, 20, now=1.5)


def test_request_bucket_not_consumed_when_tokens_refuse():
    key = KeyInfo("k", requests_per_minute=2, tokens_per_minute=60)
    rl = RateLimiter()
    rl.check(key, 60, now=0.0)
    for _ in range(3):  # token-refused requests must not eat the one request left
        with pytest.raises(Refusal, match="tokens per minute"):
            rl.check(key, 30, now=0.0)
    rl.check(key, 0, now=0.0)
    requests, tokens = rl._buckets["k"]
    assert requests.tokens == pytest.approx(0.0)


def test_token_bucket_not_consumed_when_requests_refuse():
    key = KeyInfo("k", requests_per_minute=1, tokens_per_minute=60)
    rl = RateLimiter()
    rl.check(key, 10, now=0.0)
    with pytest.raises(Refusal, match="requests per minute"):
        rl.check(key, 10, now=0.0)
    assert rl._buckets["k"][1].tokens == pytest.approx(50.0)


def test_request_larger_than_token_capacity_never_fits():
    key = KeyInfo("big", tokens_per_minute=1000)
    with pytest.raises(Refusal) as exc:
        RateLimiter().check(key, 1001, now=0.0)
    r = exc.value
    assert r.status == 429 and r.retry_after is None and "never fit" in r.message and "'big'" in r.message


def test_unlimited_and_anonymous():
    rl = RateLimiter()
    for _ in range(1000):
        rl.check(KeyInfo("free"), 10**9)
        rl.check(None, 10**9)


def test_keyinfo_validation():
    with pytest.raises(ValueError, match="key id"):
        KeyInfo("")
    with pytest.raises(ValueError, match="requests_per_minute"):
        KeyInfo("a", requests_per_minute=-1)


# --- signature policy -------------------------------------------------------------------------

def test_signature_policy_checks():
    p = SignaturePolicy(required_headers=["X-Stainless-Lang"], user_agent_patterns=[r"^OpenAI/Python ", "curl"])
    assert p.check({"x-stainless-lang": "python", "User-Agent": "OpenAI/Python 1.40.0"}) is None
    assert p.check({"X-STAINLESS-LANG": "python", "USER-AGENT": "curl/8.0"}) is None
    assert p.check({"user-agent": "OpenAI/Python 1.40.0"}) == "missing header x-stainless-lang"
    assert p.check({"x-stainless-lang": "js"}) == "missing header user-agent"
    assert p.check({"x-stainless-lang": "js", "user-agent": "wget/1.0"}) == \
        "user-agent 'wget/1.0' matches no allowed pattern"
    assert SignaturePolicy().check({}) is None


def test_signature_policy_validation():
    with pytest.raises(ValueError, match="'log' or 'block'"):
        SignaturePolicy(action="drop")
    with pytest.raises(ValueError, match=r"bad regex '\[a'"):
        SignaturePolicy(user_agent_patterns=["[a"])
    with pytest.raises(ValueError, match="list of non-empty strings"):
        SignaturePolicy(required_headers="x-a")
    with pytest.raises(ValueError, match="unknown fields"):
        SignaturePolicy.from_dict({"required_header": ["x"]})
    assert SignaturePolicy.from_dict({"action": "block"}).action == "block"


def _controller(tmp_path, global_policy=None):
    path = write_keys(tmp_path, [
        {"id": "team-a", "key": SECRET},
        {"id": "team-b", "key": "sk-b", "signature": {"required_headers": ["x-b"], "action": "block"}},
        {"id": "team-c", "key": "sk-c", "requests_per_minute": 1}])
    return AccessController(KeyStore.from_config(None, path), RateLimiter(), global_policy)


def test_signature_log_mode_lets_through_and_counts(tmp_path, caplog):
    ac = _controller(tmp_path, SignaturePolicy(required_headers=["x-stainless-lang"]))
    with caplog.at_level(logging.WARNING, logger="tokenmill.server.access"):
        assert ac.admit(f"Bearer {SECRET}", {"User-Agent": "curl"}, 5).key_id == "team-a"
    assert ac.signature_mismatches == 1
    assert "team-a" in caplog.text and "missing header x-stainless-lang" in caplog.text
    assert SECRET not in caplog.text
    ac.admit(f"Bearer {SECRET}", {"X-Stainless-Lang": "python"}, 5)
    assert ac.signature_mismatches == 1


def test_signature_block_mode_and_per_key_override(tmp_path, caplog):
    ac = _controller(tmp_path, SignaturePolicy(required_headers=["x-global"], action="block"))
    with pytest.raises(Refusal) as exc:
        ac.admit(f"Bearer {SECRET}", {}, 1)
    r = exc.value
    assert (r.status, r.reason, r.code, r.err_type) == (403, "signature", "client_signature_mismatch",
                                                        "permission_error")
    # team-b's own policy replaces the global one: x-b is needed, x-global is not.
    assert ac.admit("Bearer sk-b", {"X-B": "1"}, 1).key_id == "team-b"
    with caplog.at_level(logging.WARNING, logger="tokenmill.server.access"):
        with pytest.raises(Refusal):
            ac.admit("Bearer sk-b", {"x-global": "1"}, 1)
    assert "team-b" in caplog.text and "missing header x-b" in caplog.text and "sk-b" not in caplog.text
    assert ac.signature_mismatches == 2


def test_anonymous_gets_global_policy():
    ac = AccessController(KeyStore.from_config(None, None), RateLimiter(),
                          SignaturePolicy(user_agent_patterns=["^OpenAI"], action="block"))
    assert ac.admit(None, {"user-agent": "OpenAI/Python"}, 1) is None
    with pytest.raises(Refusal):
        ac.admit(None, {"user-agent": "curl"}, 1)


def test_refusal_logs_name_key_id_not_key(tmp_path, caplog):
    ac = _controller(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tokenmill.server.access"):
        with pytest.raises(Refusal):
            ac.admit(f"Bearer {SECRET}-wrong", {}, 1)
        ac.admit("Bearer sk-c", {}, 1)
        with pytest.raises(Refusal) as exc:
            ac.admit("Bearer sk-c", {}, 1)
    assert exc.value.status == 429
    assert "'unknown'" in caplog.text and "'team-c'" in caplog.text and "rate_limit" in caplog.text
    assert SECRET not in caplog.text and "sk-c" not in caplog.text
    assert all(rec.levelno == logging.WARNING for rec in caplog.records)


def test_from_args(tmp_path):
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps({"required_headers": ["x-a"], "action": "block"}))
    ac = AccessController.from_args("sk-1", None, str(pol))
    assert ac.keys.enabled and ac.signature.action == "block"
    pol.write_text(json.dumps({"action": "nope"}))
    with pytest.raises(ValueError, match="policy.json"):
        AccessController.from_args(None, None, str(pol))
    assert AccessController.from_args(None, None, None).signature is None


def test_to_openai_body():
    r = Refusal(429, "rate_limit", "slow down", "rate_limit_exceeded", retry_after=3.0)
    assert r.to_openai_body() == {"error": {"message": "slow down", "type": "rate_limit_error",
                                            "param": None, "code": "rate_limit_exceeded"}}
    assert str(r) == "slow down"
    assert Refusal(503, "capacity", "busy", "server_overloaded").err_type == "service_unavailable"
    assert Refusal(400, "bad_request", "bad", "invalid_request").err_type == "invalid_request_error"
    with pytest.raises(ValueError, match="reason"):
        Refusal(400, "nope", "x", "y")
