"""Target strings, the registry, and the declarative target data."""

import pytest

from hetcomp import targets
from hetcomp.errors import TargetError
from hetcomp.targets import CostModel, Precision, Target, TileGeometry


def test_parse_order_does_not_matter():
    assert targets.parse("pcm+digital").names == targets.parse("digital+pcm").names == ["digital", "pcm"]
    # canonical order: most accurate first
    assert targets.parse("photonic+reram+sram").names == ["sram", "reram", "photonic"]
    assert str(targets.parse(" pcm + digital ")) == "digital+pcm"


@pytest.mark.parametrize("spec, message", [
    ("", "empty target string"),
    ("pcm++digital", "empty target name"),
    ("pcm+", "empty target name"),
    ("pcm+pcm", "duplicate target"),
    ("pcm+gpu", "unknown target.*'gpu'.*known targets: digital, pcm, photonic, reram, sram"),
    (42, "must be a string"),
])
def test_parse_errors(spec, message):
    with pytest.raises(TargetError, match=message):
        targets.parse(spec)


def test_builtin_targets_are_declarative_and_complete():
    for name in ("digital", "pcm", "sram", "reram", "photonic"):
        target = targets.get(name)
        assert target.supports, name
        assert target.cost.modeled, f"{name}: every built-in target has a cost model"
        assert all(term.source for term in target.cost.terms), f"{name}: every energy names its source"
    assert targets.get("pcm").supports == {"weight-static"}
    assert targets.get("photonic").supports_kind("dynamic")
    assert targets.get("digital").supports_kind("dynamic")


def test_capacity_from_geometry():
    # SRAM: 100 tiles x 256 crossbars x 128 rows x (128 cols / 8 cells per weight)
    assert targets.get("sram").capacity_weights == 100 * 256 * 128 * 16
    # ReRAM: 100 tiles x 64 crossbars x 128 rows x (128 / 4)
    assert targets.get("reram").capacity_weights == 100 * 64 * 128 * 32
    assert targets.get("digital").capacity_weights is None


def test_register_user_target():
    mine = Target(
        name="myrram", description="test", analog=True, precision=Precision(4, 4, 4),
        tile=TileGeometry(64, 64, tiles=1), clock_hz=1e8,
        supports=frozenset({"weight-static"}), cost=CostModel(),
    )
    try:
        targets.register(mine)
        assert "myrram" in targets.available()
        # equal accuracy rank (0) -> ordered by name
        assert targets.parse("myrram+digital").names == ["digital", "myrram"]
        with pytest.raises(TargetError, match="already registered"):
            targets.register(mine)
    finally:
        targets.registry.TARGETS.unregister("myrram")


def test_target_validation():
    with pytest.raises(ValueError, match="name"):
        Target(name="a+b", description="", analog=False, precision=Precision(None, None, None),
               tile=None, clock_hz=None, supports=frozenset(), cost=CostModel())
    with pytest.raises(ValueError, match="op kinds"):
        Target(name="x", description="", analog=False, precision=Precision(None, None, None),
               tile=None, clock_hz=None, supports=frozenset({"conv"}),
               cost=CostModel())
