"""Pass infrastructure: a pass states what it requires and provides; the manager checks the order.

Modelled on torch.fx ``passes/infra`` and onnx_ir's pass infra (declared contracts, checked before
anything runs) and on MLIR's analysis manager (expensive analyses are cached on the context and
invalidated only by passes that change the graph).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from hetcomp import checks
from hetcomp.analysis.cache import GRAPH, AnalysisCache, AnalysisKey
from hetcomp.data import DataFormat, move, needs_loss, take_batches
from hetcomp.errors import ConfigError, HetcompError, PassOrderError
from hetcomp.memory import PeakMemory
from hetcomp.metrics import Metric, as_metric
from hetcomp.progress import bar
from hetcomp.registry import Registry
from hetcomp.targets.base import TargetSet

# What tracing provides before any pass runs.
TRACED = ("layers",)

# Annotation pipelines by name: functions of their settings that return passes ("hessian": the Hessian
# metrics compile runs when given data; registered by hetcomp.builtins).
ANNOTATION_PIPELINES: Registry[Any] = Registry("annotation pipeline", ConfigError,
                                               "register a function returning a list of passes",
                                               check=callable)


class Pass:
    """One transformation or analysis of the annotated graph.

    Subclasses set ``name``, ``requires`` and ``provides`` (metric or annotation names) and implement
    ``run(gm, ctx) -> gm``. ``changes`` says what the pass changes that cached analyses depend on
    (``GRAPH``: the graph's computation, recompiled after the pass; ``WEIGHTS``: parameter values, as
    fine-tuning does); the manager drops exactly the analyses that depend on it. Annotation and partition
    passes change neither (the default): every analysis is preserved.
    """

    name: str = "pass"
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    changes: frozenset[str] = frozenset()

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Settings recorded in the manifest next to this pass (JSON-safe)."""
        return {}

    def validate(self) -> None:
        """Raise a HetcompError if the pass's settings cannot work; compile calls it before any work."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@dataclass
class PassRecord:
    name: str
    seconds: float
    settings: dict[str, Any]
    peak_bytes: int | None = None  # hetcomp.memory.PeakMemory: what the pass added at its peak (CUDA or RSS)
    memory_kind: str = ""


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

@dataclass(frozen=True)
class CompileConfig:
    """What a compile was asked to do (fixed for the whole pipeline): targets, seed, the task (loss, how a batch
    becomes model inputs, the metric quality-driven passes score with), and the torch.distributed process group
    passes shard their work over (None: one process)."""

    targets: TargetSet
    seed: int = 0
    loss_fn: LossFn | None = None
    process_group: Any = None
    inputs_fn: Callable[[Any], Any] | None = None  # batch -> model inputs (hetcomp.data.DataFormat)
    metric: Any = None  # None: top-1 accuracy; a function (outputs, target) -> value or a hetcomp.metrics.Metric


@dataclass
class CompileContext:
    """What passes read and write besides the graph: the configuration, the data, the analysis cache and what
    the compile records (pass records, the manifest's ``extra``)."""

    config: CompileConfig
    model: nn.Module | None = None
    data: Any = None
    records: list[PassRecord] = field(default_factory=list)
    # What passes want recorded in the manifest's ``extra`` (e.g. a fine-tuning log, a search trace).
    manifest_extra: dict[str, Any] = field(default_factory=dict)
    analyses: AnalysisCache = field(default_factory=AnalysisCache)
    _calibration: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def targets(self) -> TargetSet:
        return self.config.targets

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def loss_fn(self) -> LossFn | None:
        return self.config.loss_fn

    @property
    def loss(self) -> LossFn:
        """``loss_fn``, or cross-entropy that first checks the labels (hetcomp.checks.checked_cross_entropy)."""
        return self.loss_fn if self.loss_fn is not None else checks.checked_cross_entropy

    @property
    def fmt(self) -> DataFormat:
        """How the compile's data is read (hetcomp.data): (inputs, labels) pairs, or batches through ``inputs_fn``."""
        return DataFormat(self.config.inputs_fn)

    @property
    def metric(self) -> Metric:
        """The metric quality-driven passes (LAFT's validation, mac-greedy, row remap) score with."""
        return as_metric(self.config.metric)

    def device(self, gm: nn.Module) -> torch.device:
        """Where the model lives: data and probes follow it."""
        for tensor in gm.parameters():
            return tensor.device
        return torch.device("cpu")

    def analysis(self, key: AnalysisKey, compute: Callable[[], Any]) -> Any:
        """The cached analysis for ``key``, computed once."""
        return self.analyses.get(key, compute)

    def calibration_batches(self, count: int, device: torch.device) -> list[Any]:
        """The first ``count`` batches of ``data``, taken once and reused by every pass, on ``device``.

        ``data`` may be a DataLoader / iterable of (inputs, targets) pairs, one (inputs, targets) pair of
        tensors, or batches of any structure read through ``inputs_fn`` (hetcomp.data). Checked when taken
        (DataError naming the batch): inputs finite, and with the default loss integer labels (their range is
        checked against the model's outputs by the loss); a batch that is not a labelled pair needs ``loss_fn``
        (ConfigError, before any Hessian work).
        """
        if self.data is None:
            raise ConfigError("this pass needs calibration data: pass data=<DataLoader of (inputs, targets)>")
        count = checks.integer("calibration batch count", count)
        if count not in self._calibration:
            # A shuffling loader yields the same batches for the same seed; the caller's RNG is untouched.
            fmt = self.fmt
            taken = take_batches(self.data, count, seed=self.seed, fmt=fmt)
            for index, batch in enumerate(taken):
                if not fmt.labelled(batch) and self.loss_fn is None:
                    raise needs_loss(batch)
                fmt.check(f"calibration data batch {index}", batch, labels=self.loss_fn is None)
            self._calibration[count] = taken
        return [move(batch, device) for batch in self._calibration[count]]

    def calibration_record(self) -> dict[str, dict[str, Any]]:
        """For the manifest: per batch count used, the batches, samples and a SHA-256 of the data, so two
        compiles can be checked to have seen the same calibration data."""
        from hetcomp.manifest import data_hash

        fmt = self.fmt
        return {str(count): {"batches": len(batches), "samples": sum(fmt.samples(b) for b in batches),
                             "sha256": data_hash(batches)}
                for count, batches in sorted(self._calibration.items())}


class PassInstrument:
    """Hooks around every pass (TVM's PassInstrument): ``before`` and ``after`` see the pass, the graph,
    the context and the pass's record (``after`` may fill it in)."""

    def before(self, p: Pass, gm: fx.GraphModule, ctx: CompileContext, record: PassRecord) -> None:
        pass

    def after(self, p: Pass, gm: fx.GraphModule, ctx: CompileContext, record: PassRecord) -> None:
        pass


class Timing(PassInstrument):
    """Each pass's wall time, in its record (and so in the manifest)."""

    def before(self, p: Pass, gm: fx.GraphModule, ctx: CompileContext, record: PassRecord) -> None:
        self._start = time.perf_counter()

    def after(self, p: Pass, gm: fx.GraphModule, ctx: CompileContext, record: PassRecord) -> None:
        record.seconds = time.perf_counter() - self._start


class PeakMemoryUse(PassInstrument):
    """What each pass added to memory at its peak (hetcomp.memory.PeakMemory), in its record."""

    def before(self, p: Pass, gm: fx.GraphModule, ctx: CompileContext, record: PassRecord) -> None:
        self._peak = PeakMemory(ctx.device(gm)).__enter__()

    def after(self, p: Pass, gm: fx.GraphModule, ctx: CompileContext, record: PassRecord) -> None:
        self._peak.__exit__(None, None, None)
        record.peak_bytes, record.memory_kind = self._peak.bytes, self._peak.kind


class Progress(PassInstrument):
    """A progress bar over the pipeline's passes (silenced by hetcomp.progress.set_quiet)."""

    total = 0  # set by the PassManager

    def before(self, p: Pass, gm: fx.GraphModule, ctx: CompileContext, record: PassRecord) -> None:
        if not hasattr(self, "_bar"):
            self._bar = bar(self.total, "passes")
        self._bar.set_postfix(current=p.name)

    def after(self, p: Pass, gm: fx.GraphModule, ctx: CompileContext, record: PassRecord) -> None:
        self._bar.update(1)
        if self._bar.n >= self.total:
            self._bar.close()


def default_instruments() -> list[PassInstrument]:
    return [Timing(), PeakMemoryUse(), Progress()]


class PassManager:
    """Runs passes in order after checking every requirement is provided earlier; instruments see each pass."""

    def __init__(self, passes: Sequence[Pass], provided: Iterable[str] = TRACED,
                 instruments: Sequence[PassInstrument] | None = None) -> None:
        self.passes = list(passes)
        self.initially_provided = tuple(provided)
        self.instruments = list(default_instruments() if instruments is None else instruments)
        for instrument in self.instruments:
            if isinstance(instrument, Progress):
                instrument.total = len(self.passes)
        self.validate()

    def validate(self) -> None:
        available = set(self.initially_provided)
        for position, p in enumerate(self.passes):
            if not isinstance(p, Pass):
                raise PassOrderError(
                    f"pipeline item {position} ({p!r}) is not a hetcomp Pass; subclass hetcomp.Pass"
                )
            missing = [item for item in p.requires if item not in available]
            if missing:
                providers = ", ".join(
                    f"{item!r}" + _who_provides(item, self.passes[position + 1 :]) for item in missing
                )
                raise PassOrderError(
                    f"pass '{p.name}' (position {position}) requires {providers}, which no earlier pass provides"
                )
            available.update(p.provides)
        self.provided = available

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        for p in self.passes:
            record = PassRecord(p.name, 0.0, {})
            for instrument in self.instruments:
                instrument.before(p, gm, ctx, record)
            try:
                result = p.run(gm, ctx)
            except HetcompError as err:  # name the pass that refused, keep the error's class
                raise _in_pass(err, p.name) from err
            except Exception as err:
                err.add_note(f"(raised in hetcomp pass {p.name!r})")
                raise
            gm = result if result is not None else gm
            if GRAPH in p.changes:
                gm.recompile()
            ctx.analyses.invalidate(p.changes)
            record.settings = p.settings()
            for instrument in reversed(self.instruments):
                instrument.after(p, gm, ctx, record)
            ctx.records.append(record)
        return gm


def _in_pass(err: HetcompError, name: str) -> HetcompError:
    message = str(err)
    if message.startswith(f"pass {name!r}: "):
        return err
    try:
        return type(err)(f"pass {name!r}: {message}")
    except TypeError:  # a subclass with another constructor: keep it as it is
        return err


def _who_provides(item: str, later: Sequence[Pass]) -> str:
    for p in later:
        if item in p.provides:
            return f" (provided by '{p.name}', which runs later: move it earlier)"
    return " (add a pass that provides it)"
