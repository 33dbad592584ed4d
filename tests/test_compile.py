"""compile(): strategies, pass-order checking, custom passes, manifest round trip and mismatch refusal."""

import json
import os

import pytest
import torch
import torch.nn as nn

import hetcomp
from hetcomp.errors import ConfigError, ManifestError, PassOrderError, TargetError
from hetcomp.manifest import Manifest


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 16)
        self.fc4 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc4(torch.relu(self.fc3(x)))


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):  # [B, T, 8]
        q = self.q(x)
        mixed = torch.softmax(q @ x.transpose(1, 2), -1) @ x
        return self.out(mixed.mean(1))


X = torch.randn(5, 8)


def assignments(compiled):
    return {layer["name"]: layer["assignment"] for layer in compiled.manifest.layers}


def test_strategies_assign_as_named():
    model = MLP()
    assert set(assignments(hetcomp.compile(model, "pcm+digital", (X,), strategy="all-digital")).values()) == {
        "digital"}
    assert set(assignments(hetcomp.compile(model, "pcm+digital", (X,), strategy="all-analog")).values()) == {"pcm"}
    fld = assignments(hetcomp.compile(model, "pcm+digital", (X,), strategy="first-last-digital"))
    assert fld == {"fc1": "digital", "fc2": "pcm", "fc3": "pcm", "fc4": "digital"}
    # strategy=None on pcm+digital is hilal, which needs data: the error says so and names an alternative
    with pytest.raises(ConfigError, match="'hilal' needs data=.*first-last-digital"):
        hetcomp.compile(model, "pcm+digital", (X,))
    assert set(assignments(hetcomp.compile(model, "reram", (X,))).values()) == {"reram"}


def test_mac_ratio_summary_is_hand_checkable():
    compiled = hetcomp.compile(MLP(), "pcm+digital", (X,), strategy="first-last-digital")
    macs = {"fc1": 8 * 16, "fc2": 16 * 16, "fc3": 16 * 16, "fc4": 16 * 3}
    total = sum(macs.values())
    summary = compiled.manifest.summary
    assert summary["total_macs"] == total
    assert summary["mac_ratio"]["pcm"] == pytest.approx((macs["fc2"] + macs["fc3"]) / total)
    assert summary["layers"] == {"digital": 2, "pcm": 2}


def test_dynamic_op_on_pcm_falls_back_with_reason():
    compiled = hetcomp.compile(WithAttention(), "pcm+digital", (torch.randn(2, 4, 8),), strategy="all-analog")
    dynamic = [layer for layer in compiled.manifest.layers if layer["kind"] == "dynamic"]
    assert len(dynamic) == 2
    for layer in dynamic:
        assert layer["assignment"] == "digital"
        assert "pcm does not run dynamic ops" in layer["reason"]
    with pytest.raises(TargetError, match="no target in pcm runs dynamic"):
        hetcomp.compile(WithAttention(), "pcm", (torch.randn(2, 4, 8),))


def test_bad_inputs_fail_before_work():
    with pytest.raises(TargetError, match="unknown target"):
        hetcomp.compile(MLP(), "pcm+tpu", (X,))
    with pytest.raises(ConfigError, match="unknown strategy 'magic'"):
        hetcomp.compile(MLP(), "pcm+digital", (X,), strategy="magic")
    with pytest.raises(TargetError, match="needs a digital target"):
        hetcomp.compile(MLP(), "pcm", (X,), strategy="all-digital")
    with pytest.raises(ConfigError, match="strategy 'pareto' needs data=.*pareto-po"):
        hetcomp.compile(MLP(), "sram+reram+photonic", (X,))
    with pytest.raises(ConfigError, match="example_inputs"):
        hetcomp.compile(MLP(), "pcm+digital", strategy="all-digital")
    with pytest.raises(ConfigError, match="unknown hessian setting.*'probs'"):
        hetcomp.compile(MLP(), "pcm+digital", (X,), data=(X, torch.zeros(5, dtype=torch.long)),
                        hessian={"probs": 3})


class NeedsMetric(hetcomp.Pass):
    name = "needs_metric"
    requires = ("made_up_metric",)

    def run(self, gm, ctx):
        raise AssertionError("must not run: the order check happens first")


class ProvidesMetric(hetcomp.Pass):
    name = "provides_metric"
    provides = ("made_up_metric",)

    def run(self, gm, ctx):
        return gm


def test_pass_order_checked_before_running():
    with pytest.raises(PassOrderError, match="'needs_metric' .*requires 'made_up_metric'.*add a pass"):
        hetcomp.compile(MLP(), "pcm+digital", (X,), passes=[NeedsMetric()], strategy="all-digital")
    with pytest.raises(PassOrderError, match="provided by 'provides_metric', which runs later"):
        hetcomp.PassManager([NeedsMetric(), ProvidesMetric()])
    hetcomp.PassManager([ProvidesMetric(), NeedsMetric()])  # right order is fine
    with pytest.raises(PassOrderError, match="not a hetcomp Pass"):
        hetcomp.PassManager([lambda gm: gm])
    # The Hessian passes need data, and compile says so before work
    with pytest.raises(PassOrderError, match="'scr'.*requires 'hessian_trace'"):
        hetcomp.PassManager([hetcomp.passes.SCR()])


def test_custom_pass_pins_small_layers_digital():
    from custom_pass import KeepSmallLayersDigital

    compiled = hetcomp.compile(MLP(), "pcm+digital", (X,), strategy="all-analog",
                               passes=[KeepSmallLayersDigital(max_params=200)])
    got = assignments(compiled)
    # fc1: 8*16+16=144 params, fc4: 16*3+3=51 -> digital; fc2, fc3: 272 -> pcm
    assert got == {"fc1": "digital", "fc2": "pcm", "fc3": "pcm", "fc4": "digital"}
    assert "keep_small_layers_digital" in compiled.manifest.layer("fc1")["reason"]
    assert [p["name"] for p in compiled.manifest.passes] == ["keep_small_layers_digital", "assign_all"]
    assert all(p["seconds"] >= 0 for p in compiled.manifest.passes)


def test_manifest_round_trip_and_apply(tmp_path):
    model = MLP()
    compiled = hetcomp.compile(model, "pcm+digital", (X,), strategy="first-last-digital")
    directory = compiled.save(tmp_path / "out")
    data = json.loads((directory / "manifest.json").read_text())
    assert data["schema_version"] == 3 and data["target_set"] == "digital+pcm"
    assert {t["name"] for t in data["targets"]} == {"digital", "pcm"}
    loaded = Manifest.load(directory)
    assert loaded.to_dict() == compiled.manifest.to_dict()
    applied = hetcomp.apply_manifest(model, loaded, (X,))
    assert assignments(applied) == assignments(compiled)
    torch.testing.assert_close(applied.graph(X), model(X))  # the digital graph; applied(X) is the lowered one


def test_manifest_of_other_model_is_refused(tmp_path):
    model = MLP()
    compiled = hetcomp.compile(model, "pcm+digital", (X,), strategy="first-last-digital")
    path = compiled.save(tmp_path).joinpath("manifest.json")
    other_weights = MLP()
    with pytest.raises(ManifestError, match="weights differ"):
        hetcomp.apply_manifest(other_weights, path, (X,))
    with pytest.raises(ManifestError, match="model class 'WithAttention'.*layers only in the manifest"):
        hetcomp.apply_manifest(WithAttention(), path, (torch.randn(2, 4, 8),))
    wider = MLP()
    wider.fc2, wider.fc3 = nn.Linear(16, 20), nn.Linear(20, 16)
    with pytest.raises(ManifestError, match=r"layer .fc2. shape \[16, 16\] in the manifest, \[20, 16\] in the model"):
        hetcomp.apply_manifest(wider, path, (X,))


def test_manifest_load_errors(tmp_path):
    with pytest.raises(ManifestError, match="no manifest at"):
        Manifest.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ManifestError, match="schema_version 99"):
        Manifest.load(tmp_path / "old.json")


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    compiled = hetcomp.compile(MLP(), "pcm+digital", (X,), strategy="first-last-digital")
    path = compiled.manifest.save(tmp_path / "manifest.json")
    before = path.read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    compiled.manifest.strategy = "changed"
    with pytest.raises(OSError):
        compiled.manifest.save(path)
    assert path.read_text() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_same_seed_same_manifest(digits_model):
    model, data = digits_model
    x = next(iter(data["test"]))[0]
    settings = dict(probes=4, max_iter=5, batches=1)
    first = hetcomp.compile(model, "pcm+digital", (x,), data=data["train"], seed=3, hessian=settings)
    second = hetcomp.compile(model, "pcm+digital", (x,), data=data["train"], seed=3, hessian=settings)
    strip = lambda m: {k: v for k, v in m.to_dict().items() if k != "passes"}  # noqa: E731
    assert strip(first.manifest) == strip(second.manifest)
    layer = first.manifest.layer("conv2")
    assert {"hessian_trace", "lambda_max", "hni", "scr", "row_sensitivity"} <= set(layer["metrics"])
    assert len(layer["metrics"]["row_sensitivity"]) == 32
    settings_by_pass = {p["name"]: p["settings"] for p in first.manifest.passes}
    assert settings_by_pass["hessian_trace"]["probes"] == 4 and settings_by_pass["lambda_max"]["max_iter"] == 5
