"""One error vocabulary, checked inputs (issue item 8).

Every error a user can cause is a ``HetcompError`` subclass whose message names the cause, raised before
expensive work. The table below holds one bad input per row: what it is, how to make the call, the error
class, a regex the message must match, and the work it must come before:

- ``TRACE``: before the model is traced (compile validates every argument and tensor data first);
- ``HESSIAN``: before any Hessian estimator runs (data checked when the calibration batches are taken or
  on the first forward, e.g. labels against the model's number of outputs);
- ``None``: raised where the object is made (settings objects) or where the call starts.

"Before" is counted, not timed: the trace function and the Hessian estimators are wrapped to record calls.
The LAFT / mac-greedy checkpoint tests corrupt a finished run's stage files and resume.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import hetcomp
import hetcomp.zoo.transformer
from hetcomp import checks
from hetcomp.analysis.hessian import HessianOperator
from hetcomp.errors import CheckpointError, ConfigError, DataError, HetcompError, TraceError
from hetcomp.finetune import LAFT
from hetcomp.passes import HessianTrace, LambdaMax, RowSensitivity
from hetcomp.passes.kmeans_split import KMeansSplit
from hetcomp.storage import sha256_bytes

HESSIAN = {"probes": 2, "max_iter": 3, "batches": 1}
TRACE, HESSIAN_WORK = "trace", "hessian"
CLASSES = 3


def mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def random_data(samples: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(samples, 6, generator=generator), torch.randint(0, CLASSES, (samples,), generator=generator)


class Batches:
    """A plain iterable of (inputs, labels) batches: not tensor data, so it is checked batch by batch."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, size: int = 8) -> None:
        self.batches = [(inputs[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]

    def __iter__(self):
        return iter(self.batches)


def with_nan(inputs: torch.Tensor, value: float = math.nan) -> torch.Tensor:
    inputs = inputs.clone()
    inputs[0, 0] = value
    return inputs


def compile_with(model: nn.Module | None = None, data=None, **settings):
    x, y = random_data()
    settings.setdefault("hessian", HESSIAN)
    return hetcomp.compile(mlp() if model is None else model, "pcm+digital", data=(x, y) if data is None else data,
                           **settings)


def nan_weight_model() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 1] = math.inf
    return model


def nan_buffer_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, CLASSES))
    model[1].running_var[0] = math.nan
    return model


def mutated_laft() -> LAFT:
    laft = LAFT()
    laft.momentum = -1.0  # changed after construction: compile checks again
    return laft


_DIGITAL: list = []


def digital_compiled():
    """A compiled all-digital MLP (cheap to lower), made once, for evaluate's checks."""
    if not _DIGITAL:
        _DIGITAL.append(hetcomp.compile(mlp(), "pcm+digital", example_inputs=(random_data()[0][:4],),
                                        strategy="all-digital"))
    return _DIGITAL[0]


def evaluate_with(labels: torch.Tensor | None = None, inputs: torch.Tensor | None = None, **settings):
    x, y = random_data()
    return digital_compiled().evaluate((x if inputs is None else inputs, y if labels is None else labels), **settings)


@dataclass
class Case:
    name: str
    call: Callable[[], object]
    error: type[HetcompError]
    message: str
    before: str | None = None


X, Y = random_data()
CASES = [
    # labels (default loss: cross-entropy on integer class indices)
    Case("labels out of range (tensor data)", lambda: compile_with(data=(X, Y + 5)), DataError,
         r"labels are outside \[0, 3\) or the ignore index -100 \(e\.g\. [5-7]\) but the model has 3 outputs",
         HESSIAN_WORK),
    Case("labels out of range (loader)", lambda: compile_with(data=Batches(X, Y - 3)), DataError,
         r"labels are outside \[0, 3\).*pass class indices 0\.\.2", HESSIAN_WORK),
    Case("float labels (tensor data)", lambda: compile_with(data=(X, Y.float())), DataError,
         r"labels have dtype float32.*labels\.long\(\)", TRACE),
    Case("float labels (loader)", lambda: compile_with(data=Batches(X, Y.float())), DataError,
         r"calibration data batch 0: labels have dtype float32", HESSIAN_WORK),
    Case("labels of the wrong shape", lambda: compile_with(data=Batches(X, Y[:, None])), DataError,
         r"labels of shape \[8, 1\] do not fit model outputs of shape \[8, 3\]", HESSIAN_WORK),
    Case("all labels ignored", lambda: compile_with(data=Batches(X, torch.full_like(Y, -100))), DataError,
         r"every label is the ignore index -100.*every layer digital", HESSIAN_WORK),
    # NaN/Inf in data or weights
    Case("NaN inputs (tensor data)", lambda: compile_with(data=(with_nan(X), Y)), DataError,
         r"data: inputs: 1 of 192 values are NaN or Inf; drop or repair", TRACE),
    Case("Inf inputs with power iteration (was silently all-digital)",
         lambda: compile_with(data=(with_nan(X, math.inf), Y), hessian={**HESSIAN, "eigen_method": "power",
                                                                        "deflate": False}),
         DataError, r"inputs: 1 of 192 values are NaN or Inf", TRACE),
    Case("NaN inputs (loader)", lambda: compile_with(data=Batches(with_nan(X), Y)), DataError,
         r"calibration data batch 0: inputs: 1 of 48 values are NaN or Inf", HESSIAN_WORK),
    Case("Inf weight", lambda: compile_with(nan_weight_model()), DataError,
         r"parameter '2\.weight': 1 of 64 values are NaN or Inf; .*load finite weights", TRACE),
    Case("NaN BatchNorm statistics", lambda: compile_with(nan_buffer_model()), DataError,
         r"buffer '1\.running_var': 1 of 8 values are NaN or Inf", TRACE),
    Case("no batch in data", lambda: compile_with(data=Batches(X[:0], Y[:0]), example_inputs=(X[:2],)), DataError,
         r"data yielded no batch; pass a non-empty DataLoader", HESSIAN_WORK),
    Case("batches that are not pairs", lambda: compile_with(data=[X[:8], X[8:16], X[16:24]], example_inputs=(X[:2],)),
         DataError, r"data batch 0 is a Tensor, not an \(inputs, targets\) pair", HESSIAN_WORK),
    # Hessian settings
    Case("NaN gamma", lambda: compile_with(hessian={**HESSIAN, "gamma": math.nan}), ConfigError,
         r"gamma \(relative weight noise\) must be None or a finite number > 0, got nan \(float\)", TRACE),
    Case("probes=2.5", lambda: compile_with(hessian={**HESSIAN, "probes": 2.5}), ConfigError,
         r"probes must be an integer >= 1, got 2\.5 \(float\)", TRACE),
    Case("probes='3'", lambda: compile_with(hessian={**HESSIAN, "probes": "3"}), ConfigError,
         r"probes must be an integer >= 1, got '3' \(str\)", TRACE),
    Case("probes=True", lambda: compile_with(hessian={**HESSIAN, "probes": True}), ConfigError,
         r"probes must be an integer >= 1, got True \(bool\)", TRACE),
    Case("max_iter=0", lambda: compile_with(hessian={**HESSIAN, "max_iter": 0}), ConfigError,
         r"max_iter must be an integer >= 1, got 0", TRACE),
    Case("tol=inf", lambda: compile_with(hessian={**HESSIAN, "tol": math.inf}), ConfigError,
         r"tol must be a finite number >= 0, got inf", TRACE),
    Case("estimator='fast'", lambda: compile_with(hessian={**HESSIAN, "estimator": "fast"}), ConfigError,
         r"estimator must be one of 'full', 'block', got 'fast'", TRACE),
    Case("deflate='yes'", lambda: compile_with(hessian={**HESSIAN, "deflate": "yes"}), ConfigError,
         r"deflate must be True or False, got 'yes'", TRACE),
    Case("hessian not a dict", lambda: compile_with(hessian=[("probes", 2)]), ConfigError,
         r"hessian must be None or a dict", TRACE),
    # compile arguments
    Case("seed=-1 (failed in KMeans after the work)", lambda: compile_with(seed=-1), ConfigError,
         r"seed must be an integer in \[0, 2\*\*63\), got -1 \(int\)", TRACE),
    Case("seed=2**63", lambda: compile_with(seed=2**63), ConfigError, r"seed must be an integer in \[0, 2\*\*63\)",
         TRACE),
    Case("seed=1.5", lambda: compile_with(seed=1.5), ConfigError, r"seed must be an integer.*got 1\.5 \(float\)",
         TRACE),
    Case("strategy=42", lambda: compile_with(strategy=42), ConfigError,
         r"strategy must be a name such as 'hilal' .*got 42 \(int\)", TRACE),
    Case("loss_fn=42", lambda: compile_with(loss_fn=42), ConfigError,
         r"loss_fn must be None or a function \(logits, labels\).*got 42 \(int\)", TRACE),
    Case("passes not a list", lambda: compile_with(passes=HessianTrace()), ConfigError,
         r"passes must be a list of hetcomp Pass objects.*passes=\[my_pass\]", TRACE),
    Case("frontend='jit'", lambda: compile_with(frontend="jit"), ConfigError,
         r"frontend must be one of 'auto', 'fx', 'export', got 'jit'", TRACE),
    Case("finetune changed after construction", lambda: compile_with(finetune=mutated_laft()), ConfigError,
         r"LAFT momentum must be a finite number >= 0, got -1\.0", TRACE),
    # example inputs that do not run through the model
    Case("example inputs of the wrong shape",
         lambda: compile_with(example_inputs=(torch.randn(2, 3),)), TraceError,
         r"example inputs \(shape \[2, 3\], float32\) do not run through Sequential: RuntimeError: mat1 and mat2 "
         r"shapes cannot be multiplied.*\(at module '0', Linear\); pass a batch shaped like the model's input",
         HESSIAN_WORK),
    Case("example inputs of the wrong dtype",
         lambda: compile_with(example_inputs=(torch.zeros(2, 6, dtype=torch.long),)), TraceError,
         r"example inputs \(shape \[2, 6\], int64\) do not run through Sequential: .*dtype", HESSIAN_WORK),
    # LAFT settings (checked where the LAFT object is made)
    Case("LAFT epochs=2.5", lambda: LAFT(epochs=2.5), ConfigError, r"LAFT epochs must be an integer >= 1, got 2\.5"),
    Case("LAFT negative momentum", lambda: LAFT(momentum=-0.5), ConfigError,
         r"LAFT momentum must be a finite number >= 0, got -0\.5"),
    Case("LAFT batch_size=0 (was silently the loader's)", lambda: LAFT(batch_size=0), ConfigError,
         r"LAFT batch_size .*must be None or an integer >= 1, got 0"),
    Case("LAFT negative batch_size", lambda: LAFT(batch_size=-4), ConfigError, r"LAFT batch_size .*got -4"),
    Case("LAFT stop_after=-1 (was silently 'stop now')", lambda: LAFT(stop_after=-1), ConfigError,
         r"LAFT stop_after .*must be None or an integer >= 1, got -1"),
    Case("LAFT stop_after=0", lambda: LAFT(stop_after=0), ConfigError, r"LAFT stop_after .*got 0"),
    Case("LAFT val_fraction=1", lambda: LAFT(val_fraction=1.0), ConfigError,
         r"LAFT val_fraction must be a finite number in \(0, 1\), got 1\.0"),
    Case("LAFT lr_analog=nan", lambda: LAFT(lr_analog=math.nan), ConfigError,
         r"LAFT lr_analog must be a finite number > 0, got nan"),
    Case("LAFT resume='yes'", lambda: LAFT(resume="yes"), ConfigError, r"LAFT resume must be True or False"),
    # evaluate
    Case("evaluate batch_size=0 (was silently the default)", lambda: evaluate_with(batch_size=0), ConfigError,
         r"batch_size .*must be None or an integer >= 1, got 0"),
    Case("evaluate repeats=2.5", lambda: evaluate_with(repeats=2.5), ConfigError,
         r"repeats must be an integer >= 1, got 2\.5"),
    Case("evaluate t_inference=nan", lambda: evaluate_with(t_inference=math.nan), ConfigError,
         r"t_inference .*must be a finite number >= 0, got nan"),
    Case("evaluate float labels", lambda: evaluate_with(labels=Y.float()), DataError,
         r"evaluation data: labels have dtype float32"),
    Case("evaluate labels out of range", lambda: evaluate_with(labels=Y + 3), DataError,
         r"evaluation data: .*labels are outside \[0, 3\) \(e\.g\. [3-5]\)"),
    Case("evaluate NaN inputs", lambda: evaluate_with(inputs=with_nan(X)), DataError,
         r"evaluation data: inputs: 1 of 192 values are NaN or Inf"),
    # strategies and pass settings (checked where they are made)
    Case("mac_greedy threshold=-0.1", lambda: hetcomp.strategies.mac_greedy(threshold=-0.1), ConfigError,
         r"mac-greedy threshold .*must be a finite number in \[0, 1\), got -0\.1"),
    Case("mac_greedy eval_repeats=0", lambda: hetcomp.strategies.mac_greedy(eval_repeats=0), ConfigError,
         r"mac-greedy eval_repeats must be an integer >= 1, got 0"),
    Case("pareto population=2.5", lambda: hetcomp.strategies.pareto(population=2.5), ConfigError,
         r"NSGA-II population must be an integer >= 4, got 2\.5"),
    Case("pareto samples=nan", lambda: hetcomp.strategies.pareto(samples=math.nan), ConfigError,
         r"samples .*must be a finite number > 0, got nan"),
    Case("pareto repeats='3'", lambda: hetcomp.strategies.pareto(repeats="3"), ConfigError,
         r"repeats must be an integer >= 1, got '3'"),
    Case("LambdaMax method='qr'", lambda: LambdaMax(method="qr"), ConfigError,
         r"eigen_method must be one of 'lanczos', 'power', got 'qr'"),
    Case("RowSensitivity weight_bits=1", lambda: RowSensitivity(weight_bits=1), ConfigError,
         r"weight_bits must be None or an integer >= 2, got 1"),
    Case("KMeansSplit restarts=0", lambda: KMeansSplit("digital", "pcm", restarts=0), ConfigError,
         r"restarts must be an integer >= 1, got 0"),
    Case("KMeansSplit features='hni'", lambda: KMeansSplit("digital", "pcm", features="hni"), ConfigError,
         r"features must be a non-empty tuple of metric names"),
    Case("zoo transformer heads", lambda: hetcomp.zoo.transformer.Attention(10, 3, False), ConfigError,
         r"dim 10 is not divisible by heads 3"),
]


@pytest.fixture
def work_log(monkeypatch):
    """Records each call of the trace function and of the Hessian estimators."""
    log: list[str] = []
    real_trace = hetcomp.compiler.trace

    def trace(*args, **kwargs):
        log.append(TRACE)
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(hetcomp.compiler, "trace", trace)
    for name in ("hutchinson", "lanczos", "power_iteration"):
        real = getattr(HessianOperator, name)

        def estimator(self, *args, _real=real, **kwargs):
            log.append(HESSIAN_WORK)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(HessianOperator, name, estimator)
    return log


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_raises_a_named_hetcomp_error_before_the_work(case, work_log):
    with pytest.raises(case.error, match=case.message) as raised:
        case.call()
    assert isinstance(raised.value, HetcompError)
    if case.before == TRACE:
        assert work_log == [], f"raised after {work_log}"
    elif case.before == HESSIAN_WORK:
        assert HESSIAN_WORK not in work_log, f"raised after {work_log}"


def test_the_checks_accept_what_they_should():
    assert checks.integer("n", 3) == 3 and checks.integer("n", torch.tensor(3).numpy()[()]) == 3
    assert checks.integer("n", None, optional=True) is None
    assert checks.real("x", 1) == 1.0 and checks.real("x", 0.0, 0.0) == 0.0
    assert checks.seed(0) == 0 and checks.seed(2**63 - 1) == 2**63 - 1
    with pytest.raises(ConfigError, match=r"x must be a finite number > 0, got 0\.0"):
        checks.real("x", 0.0, 0.0, exclusive=True)
    # the checked default loss is cross-entropy where the labels are fine (the ignore index included)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, -100, 1, 1])
    torch.testing.assert_close(checks.checked_cross_entropy(logits, labels),
                               nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(checks.checked_cross_entropy(logits, labels.int()),  # int32: cross_entropy refuses
                               nn.functional.cross_entropy(logits, labels))


def test_a_large_seed_reaches_kmeans_in_range():
    x, y = random_data()
    compiled = hetcomp.compile(mlp(), "pcm+digital", data=(x, y), hessian=HESSIAN, seed=2**40)  # hilal: KMeans
    assert compiled.manifest.seed == 2**40


def test_no_raw_builtin_raise_in_the_package():
    """Every raise in hetcomp is a HetcompError subclass, except an internal invariant (NSGA-II's feasibility,
    which check_feasible guarantees beforehand) and Manifest.layer's KeyError (a lookup by name, as a mapping's)."""
    internal = {("partition/nsga.py", "RuntimeError"), ("manifest.py", "KeyError")}
    builtin = {"ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "AssertionError", "Exception"}
    root = Path(hetcomp.__file__).parent
    raw = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    isinstance(node.exc.func, ast.Name) and node.exc.func.id in builtin:
                where = (path.relative_to(root).as_posix(), node.exc.func.id)
                if where not in internal:
                    raw.append(f"{where[0]}:{node.lineno} {where[1]}")
    assert raw == []


# -- LAFT and mac-greedy checkpoints ---------------------------------------------------------------------

def laft(directory: Path, **settings) -> LAFT:
    return LAFT(epochs=1, patience=1, val_repeats=1, val_t_inference=None, batch_size=16, checkpoint_dir=directory,
                **settings)


def compile_laft(directory: Path, **settings):
    x, y = random_data(64)
    return hetcomp.compile(mlp(), "pcm+digital", data=(x, y), hessian=HESSIAN, strategy="all-analog",
                           finetune=laft(directory, **settings))


@pytest.fixture(scope="module")
def finished_laft(tmp_path_factory):
    """A finished three-stage LAFT run (all three layers analog) and its final weights."""
    root = tmp_path_factory.mktemp("laft")
    compiled = compile_laft(root)
    assert len(compiled.manifest.extra["finetune"]["stages"]) == 3
    return root, {k: v.clone() for k, v in compiled.graph.state_dict().items()}


def copied_run(finished, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished run: (checkpoint root, the run's folder)."""
    root = tmp_path / "laft"
    shutil.copytree(finished[0], root)
    (run,) = root.iterdir()
    return root, run


def test_laft_checkpoints_are_safetensors_with_checksums_and_resume(finished_laft, tmp_path):
    root, run = copied_run(finished_laft, tmp_path)
    progress = json.loads((run / "progress.json").read_text())
    assert progress["method"] == "LAFT" and run.name == progress["run_key"]
    assert [s["tensors"]["file"] for s in progress["steps"]] == [f"step-{i:02d}.safetensors" for i in range(3)]
    for entry in (step["tensors"] for step in progress["steps"]):
        content = (run / entry["file"]).read_bytes()
        assert sha256_bytes(content) == entry["sha256"] and len(content) == entry["bytes"]
        safetensors_load(content)
    resumed = compile_laft(root)  # all stages done: loads the last checkpoint
    assert all(torch.equal(finished_laft[1][k], v) for k, v in resumed.graph.state_dict().items())


def _truncate(run: Path) -> None:
    path = run / "step-02.safetensors"
    path.write_bytes(path.read_bytes()[:-40])


def _empty(run: Path) -> None:
    (run / "step-02.safetensors").write_bytes(b"")


def _replace(run: Path) -> None:  # another valid tensor file of the same size: only the checksum tells
    shutil.copyfile(run / "step-00.safetensors", run / "step-02.safetensors")


def _nan(run: Path, update_progress: bool = True) -> None:
    path = run / "step-02.safetensors"
    state = safetensors_load(path.read_bytes())
    state["0.weight"][0, 0] = math.nan
    content = safetensors_save(state)
    path.write_bytes(content)
    if update_progress:  # as if the run itself had written it: the checksum matches, the values do not
        progress = json.loads((run / "progress.json").read_text())
        progress["steps"][2]["tensors"].update(sha256=sha256_bytes(content), bytes=len(content))
        (run / "progress.json").write_text(json.dumps(progress))


def _malformed_progress(run: Path) -> None:
    (run / "progress.json").write_text('{"format": 2, "run_key": ')


def _missing(run: Path) -> None:
    (run / "step-01.safetensors").unlink()


def _foreign_weights(run: Path) -> None:  # well-formed, checksummed, but not this model's tensors
    content = safetensors_save({"fc.weight": torch.zeros(2, 2)})
    (run / "step-02.safetensors").write_bytes(content)
    progress = json.loads((run / "progress.json").read_text())
    progress["steps"][2]["tensors"].update(sha256=sha256_bytes(content), bytes=len(content))
    (run / "progress.json").write_text(json.dumps(progress))


CORRUPTIONS = [
    ("truncated", _truncate, r"step-02\.safetensors is corrupted \(\d+ bytes, progress\.json recorded \d+: truncated"),
    ("zero-length", _empty, r"step-02\.safetensors is corrupted \(zero-length file\)"),
    ("replaced", _replace, r"step-02\.safetensors is corrupted \(its SHA-256 does not match progress\.json"),
    ("NaN, checksum updated", _nan, r"step-02\.safetensors is corrupted \(tensor '0\.weight' holds 1 NaN/Inf value\)"),
    ("NaN, checksum stale", lambda run: _nan(run, update_progress=False),
     r"step-02\.safetensors is corrupted \((its SHA-256 does not match|\d+ bytes)"),
    ("malformed progress.json", _malformed_progress, r"progress\.json is corrupted \(not readable JSON"),
    ("missing step file", _missing, r"step-01\.safetensors is corrupted \(missing, but progress\.json lists it\)"),
    ("another model's weights", _foreign_weights, r"step-02\.safetensors is corrupted \(it holds another model's"),
]


@pytest.mark.parametrize("corrupt, message", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_laft_checkpoint_is_refused_with_the_fix(finished_laft, tmp_path, corrupt, message):
    root, run = copied_run(finished_laft, tmp_path)
    corrupt(run)
    with pytest.raises(CheckpointError, match=message) as raised:
        compile_laft(root)
    assert "LAFT checkpoint " in str(raised.value)
    assert f"resume with resume=False or delete {run}" in str(raised.value)


def test_resume_false_recomputes_over_a_corrupted_checkpoint(finished_laft, tmp_path):
    root, run = copied_run(finished_laft, tmp_path)
    _empty(run)
    again = compile_laft(root, resume=False)
    assert all(torch.equal(finished_laft[1][k], v) for k, v in again.graph.state_dict().items())
    assert compile_laft(root).manifest.extra["finetune"]["complete"]  # the rewritten run resumes cleanly


class Samples(torch.utils.data.Dataset):
    """A map-style dataset that is not a TensorDataset: LAFT checks its batches as it trains on them."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.inputs[index], self.labels[index]


def test_laft_checks_its_training_and_validation_data(tmp_path):
    x, y = random_data(64)
    bad = x.clone()
    bad[40:, 0] = math.nan  # past the calibration batch: only training reads it
    loader = torch.utils.data.DataLoader(Samples(bad, y), batch_size=16)
    with pytest.raises(DataError, match=r"training data batch \d+: inputs: \d+ of 96 values are NaN or Inf"):
        hetcomp.compile(mlp(), "pcm+digital", data=loader, hessian=HESSIAN, strategy="all-analog",
                        finetune=laft(None, val_data=(x[:8], y[:8])))
    with pytest.raises(DataError, match=r"validation data \(val_data\): labels have dtype float32"):
        hetcomp.compile(mlp(), "pcm+digital", data=(x, y), hessian=HESSIAN, strategy="all-analog",
                        finetune=laft(None, val_data=(x[:8], y[:8].float())))
    with pytest.raises(DataError, match=r"validation data: .*labels are outside \[0, 3\)"):
        hetcomp.compile(mlp(), "pcm+digital", data=(x, y), hessian=HESSIAN, strategy="all-analog",
                        finetune=laft(None, val_data=(x[:8], y[:8] + 3)))


def test_corrupted_mac_greedy_checkpoint_is_refused(tmp_path):
    x, y = random_data(64)
    strategy = hetcomp.strategies.mac_greedy(threshold=0.5, eval_repeats=1)

    def run():
        return hetcomp.compile(mlp(), "pcm+digital", data=(x, y), hessian=HESSIAN, strategy=strategy,
                               finetune=laft(tmp_path))

    assert len(run().manifest.extra["finetune"]["trials"]) == 3
    (folder,) = tmp_path.iterdir()
    last = max(folder.glob("step-*.safetensors"))  # the last accepted candidate's (a rejected one has none)
    last.write_bytes(last.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=rf"mac-greedy checkpoint .*{last.name} is corrupted .*"
                                              rf"resume with resume=False or delete {folder}"):
        run()
