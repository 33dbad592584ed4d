"""Pass infrastructure: configuration apart from state, typed analysis keys invalidated by what a pass
changes, instruments around every pass, errors that name the pass."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import hetcomp
from hetcomp.analysis.cache import GRAPH, WEIGHTS, AnalysisKey
from hetcomp.errors import ConfigError
from hetcomp.passes.base import CompileConfig, CompileContext, Pass, PassInstrument, PassManager
from hetcomp.targets import parse


@dataclass(frozen=True)
class WeightNorm(AnalysisKey):
    layer: str


@dataclass(frozen=True)
class LayerCount(AnalysisKey):
    depends_on = frozenset({GRAPH})


class Measure(Pass):
    name = "measure"

    def __init__(self, log):
        self.log = log

    def run(self, gm, ctx):
        weight = gm.get_submodule("0").weight.detach()
        norm = ctx.analysis(WeightNorm("0"), lambda: self.log.append("norm") or float(weight.norm()))
        ctx.analysis(LayerCount(), lambda: self.log.append("count") or len(list(gm.graph.nodes)))
        ctx.manifest_extra.setdefault("norms", []).append(norm)
        return gm


class Scale(Pass):
    name = "scale"
    changes = frozenset({WEIGHTS})

    def run(self, gm, ctx):
        with torch.no_grad():
            gm.get_submodule("0").weight.mul_(2)
        return gm


class Annotate(Pass):
    name = "annotate"  # changes nothing analyses depend on: everything is preserved

    def run(self, gm, ctx):
        return gm


class Refuse(Pass):
    name = "refuse"

    def run(self, gm, ctx):
        raise ConfigError("not today")


class Recorder(PassInstrument):
    def __init__(self):
        self.events = []

    def before(self, p, gm, ctx, record):
        self.events.append(("before", p.name))

    def after(self, p, gm, ctx, record):
        self.events.append(("after", p.name, record.seconds >= 0))


def graph():
    torch.manual_seed(0)
    return hetcomp.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 4),))


def test_analyses_are_dropped_only_when_what_they_depend_on_changes():
    log = []
    ctx = CompileContext(CompileConfig(parse("digital"), seed=3))
    assert ctx.seed == 3 and ctx.targets.names == ["digital"] and ctx.config.process_group is None
    recorder = Recorder()
    instruments = [recorder, *hetcomp.passes.base.default_instruments()]
    PassManager([Measure(log), Annotate(), Measure(log), Scale(), Measure(log)], instruments=instruments).run(
        graph(), ctx)
    # Annotate preserved both; Scale changed weights: the norm is recomputed, the graph-only count is not.
    assert log == ["norm", "count", "norm"]
    first, _, third = ctx.manifest_extra["norms"]
    assert third == pytest.approx(2 * first)
    assert recorder.events[:2] == [("before", "measure"), ("after", "measure", True)]
    assert len(recorder.events) == 10
    assert [r.name for r in ctx.records] == ["measure", "annotate", "measure", "scale", "measure"]
    assert all(r.seconds >= 0 and r.memory_kind for r in ctx.records)


def test_a_failing_pass_is_named_and_keeps_its_error_class():
    ctx = CompileContext(CompileConfig(parse("digital")))
    with pytest.raises(ConfigError, match="^pass 'refuse': not today$"):
        PassManager([Annotate(), Refuse()]).run(graph(), ctx)


def test_untyped_analysis_keys_are_refused():
    ctx = CompileContext(CompileConfig(parse("digital")))
    with pytest.raises(ConfigError, match="AnalysisKey"):
        ctx.analysis(("hessian", 1), lambda: 0)
