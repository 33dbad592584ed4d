"""The strategy registry refuses to overwrite a name silently (as the target registry does)."""

from __future__ import annotations

import pytest

from hetcomp.errors import ConfigError
from hetcomp.partition.strategy import STRATEGIES
from hetcomp.passes.equal_split import EqualSplit
from hetcomp.strategies import Strategy, available_strategies, register_strategy


def test_register_strategy_refuses_a_duplicate_name_unless_overwrite(monkeypatch):
    original = STRATEGIES.get("hilal")  # loads the built-ins
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))  # restored after the test
    impostor = Strategy("hilal", "not HILAL", lambda ts, _: [EqualSplit()])
    with pytest.raises(ConfigError, match="strategy 'hilal' is already registered; pass overwrite=True"):
        register_strategy(impostor)
    assert STRATEGIES.get("hilal") is original
    assert register_strategy(impostor, overwrite=True) is impostor and STRATEGIES.get("hilal") is impostor
    mine = register_strategy(Strategy("my-split", "mine", lambda ts, _: [EqualSplit()]))
    assert "my-split" in available_strategies() and STRATEGIES.get("my-split") is mine
    with pytest.raises(ConfigError, match="strategy 'my-split' is already registered"):
        register_strategy(Strategy("my-split", "again", lambda ts, _: [EqualSplit()]))
    with pytest.raises(ConfigError, match=r"takes a hetcomp.strategies.Strategy, got 'hilal' \(str\)"):
        register_strategy("hilal")
