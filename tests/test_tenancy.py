"""Key scopes and budget periods (nebula/tenancy.py, pure)."""

from __future__ import annotations

import datetime as dt

import pytest

from nebula.errors import InvalidRequest
from nebula.tenancy import allows, check_budget, check_models, period_of


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def test_budget_periods_are_utc_days_and_months() -> None:
    assert period_of("day", at("2026-12-31T23:59:59")) == ("2026-12-31", at("2027-01-01T00:00"))
    assert period_of("month", at("2026-12-31T23:59:59")) == ("2026-12", at("2027-01-01T00:00"))
    assert period_of("month", at("2027-02-01T00:00:00")) == ("2027-02", at("2027-03-01T00:00"))
    assert period_of("day", at("2028-02-29T12:00:00")) == ("2028-02-29", at("2028-03-01T00:00"))


def test_model_patterns() -> None:
    assert allows((), "anything")
    assert allows(("chat-*",), "chat-small") and not allows(("chat-*",), "embed-small")
    assert allows(("tiny_?", "big"), "tiny_a") and not allows(("tiny_?",), "tiny_ab")
    assert not allows(("Chat-*",), "chat-small")  # names are case-sensitive


@pytest.mark.parametrize(
    "bad", [["a b"], ["x" * 65], ["a/b"], [None], "chat", ["ok"] * 65, ["a\nb"]]
)
def test_bad_model_patterns_are_refused(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        check_models(bad)
    assert check_models(["*"]) == ("*",)  # every model, spelled out: allowed
    assert check_models(None) == ()


@pytest.mark.parametrize("tokens", [0, -1, 1.5, True, "100", 10**16])
def test_bad_budgets_are_refused(tokens: object) -> None:
    with pytest.raises(InvalidRequest):
        check_budget(tokens, "day")
    assert check_budget(None, None) == (None, "day")
    with pytest.raises(InvalidRequest):
        check_budget(100, "week")
