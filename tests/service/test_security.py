"""service.security: the constant-time key comparison."""

from __future__ import annotations

from service.security import key_matches


def test_key_comparison() -> None:
    assert key_matches("abc", "abc")
    assert not key_matches("abd", "abc")
    assert not key_matches(None, "abc")
    assert not key_matches("", "abc")
    assert key_matches("ключ", "ключ")
