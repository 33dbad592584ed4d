"""LAFT (order, checkpoints, exact resume after a kill) and the mac-greedy search (constructed cases)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import hetcomp
from hetcomp.finetune import LAFT
from hetcomp.finetune import laft as laft_module
from hetcomp.storage import sha256_file

# "block" probes one layer at a time. The digits CNN is piecewise linear in each layer's weight (ReLU, max-pool),
# so every layer's Hessian block is positive semi-definite and each probe's v'Hv >= 0: every HNI is defined
# (positive), whatever the trained weights, and LAFT's order by HNI is a total order. The "full" estimator's
# cross-layer terms can make a trace estimate negative (HNI undefined, ordered last) on some weights.
HESSIAN = dict(probes=4, max_iter=5, batches=1, estimator="block")


# The partition is pinned, not left to hilal: which layers a k-means split of a trained model puts on PCM
# depends on float results that differ between CPUs (one machine's split had 2 analog layers, another's 4).
# first-last-digital puts exactly the four inner layers on PCM on every machine: LAFT has four stages.
STRATEGY = "first-last-digital"
ANALOG = {"conv2", "conv3", "conv4", "fc1"}


def compile_with_laft(digits_model, **settings):
    model, data = digits_model
    x = next(iter(data["test"]))[0]
    finetune = LAFT(epochs=2, patience=1, val_repeats=1, val_data=data["val"], **settings)
    return hetcomp.compile(model, "pcm+digital", (x,), data=data["train"], strategy=STRATEGY, hessian=HESSIAN,
                           finetune=finetune)


def weights(compiled):
    return compiled.graph.state_dict()


def test_laft_orders_by_hni_and_leaves_the_callers_model_alone(digits_model, tmp_path):
    model, _ = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = compile_with_laft(digits_model, checkpoint_dir=tmp_path)
    log = compiled.manifest.extra["finetune"]
    analog = [layer for layer in compiled.manifest.layers if layer["assignment"] == "pcm"]
    assert {layer["name"] for layer in analog} == ANALOG
    assert log["order"] == [layer["name"] for layer in sorted(analog, key=lambda layer: layer["metrics"]["hni"])]
    assert [stage["layers"] for stage in log["stages"]] == [log["order"][: i + 1] for i in range(len(log["order"]))]
    assert log["complete"] and all(1 <= stage["epochs"] <= 2 for stage in log["stages"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert compiled.manifest.finetuned  # the compiled weights differ from the input model's
    # checkpoints are safetensors files (no pickle) and the progress file is JSON with each file's SHA-256
    directory = tmp_path / next(p.name for p in tmp_path.iterdir())
    assert log["checkpoints"] == str(directory)
    progress = json.loads((directory / "progress.json").read_text())
    assert [step["record"] for step in progress["steps"]] == log["stages"]
    last = load_file(directory / f"step-{len(log['order']) - 1:02d}.safetensors")
    entry = progress["steps"][-1]["tensors"]
    assert entry["sha256"] == sha256_file(directory / entry["file"])
    assert all(torch.equal(last[k], v) for k, v in weights(compiled).items())


def test_killed_laft_resumes_from_last_finished_stage_to_the_same_result(digits_model, tmp_path, monkeypatch):
    uninterrupted = compile_with_laft(digits_model, checkpoint_dir=tmp_path / "a")
    stages = len(uninterrupted.manifest.extra["finetune"]["order"])
    assert stages == len(ANALOG) == 4  # pinned by the strategy: killed in stage 3, two stages are left to resume

    real_train_stage = laft_module.train_stage
    calls = []

    def killed_in_stage_3(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_train_stage(*args, **kwargs)

    monkeypatch.setattr(laft_module, "train_stage", killed_in_stage_3)
    with pytest.raises(KeyboardInterrupt):
        compile_with_laft(digits_model, checkpoint_dir=tmp_path / "b")
    (run,) = (tmp_path / "b").iterdir()
    assert len(json.loads((run / "progress.json").read_text())["steps"]) == 2

    calls.clear()

    def counted(*args, **kwargs):
        calls.append(kwargs["desc"])
        return real_train_stage(*args, **kwargs)

    monkeypatch.setattr(laft_module, "train_stage", counted)
    resumed = compile_with_laft(digits_model, checkpoint_dir=tmp_path / "b")
    assert len(calls) == 2 and calls[0].startswith("LAFT stage 3/4") and calls[1].startswith("LAFT stage 4/4")
    expected = weights(uninterrupted)
    assert all(torch.equal(expected[k], v) for k, v in weights(resumed).items())
    strip = [{k: v for k, v in s.items() if k != "seconds"} for s in resumed.manifest.extra["finetune"]["stages"]]
    assert strip == [{k: v for k, v in s.items() if k != "seconds"}
                     for s in uninterrupted.manifest.extra["finetune"]["stages"]]


def test_stop_after_then_resume_and_no_resume_restarts(digits_model, tmp_path):
    partial = compile_with_laft(digits_model, checkpoint_dir=tmp_path, stop_after=1)
    assert len(partial.manifest.extra["finetune"]["stages"]) == 1 and not partial.manifest.extra["finetune"]["complete"]
    assert len(partial.manifest.extra["finetune"]["order"]) == len(ANALOG)  # so one stage cannot be all of them
    full = compile_with_laft(digits_model, checkpoint_dir=tmp_path)
    assert full.manifest.extra["finetune"]["complete"]
    fresh = compile_with_laft(digits_model, checkpoint_dir=None)  # in memory: same computation
    assert all(torch.equal(weights(full)[k], v) for k, v in weights(fresh).items())


def test_finetune_needs_data_and_valid_settings(digits_model):
    model, data = digits_model
    x = next(iter(data["test"]))[0]
    with pytest.raises(hetcomp.ConfigError, match="finetune .*needs training data"):
        hetcomp.compile(model, "pcm+digital", (x,), strategy="first-last-digital", finetune=LAFT())
    with pytest.raises(hetcomp.ConfigError, match="patience must be an integer >= 1, got 0"):
        LAFT(patience=0)
    with pytest.raises(hetcomp.ConfigError, match=r"finetune must be a .*hetcomp\.LAFT"):
        hetcomp.compile(model, "pcm+digital", (x,), data=data["train"], finetune={"epochs": 3})


def greedy(digits_model, target, threshold, checkpoints=None, val=None):
    model, data = digits_model
    x = next(iter(data["test"]))[0]
    strategy = hetcomp.strategies.mac_greedy(threshold=threshold, eval_repeats=2)
    return hetcomp.compile(model, target, (x,), data=data["train"], strategy=strategy,
                           finetune=LAFT(epochs=1, patience=1, val_repeats=1,
                                         val_data=data["val"] if val is None else val, checkpoint_dir=checkpoints))


def register_for_this_test(monkeypatch, target):
    from hetcomp.targets.registry import TARGETS

    TARGETS.names()  # the built-ins first, so the test's entry is the only change undone afterwards
    monkeypatch.setitem(TARGETS._entries, target.name, target)
    return target.name


def ideal_pcm():
    """PCM with every non-ideality off (programming and read noise, drift, converters, output noise): an analog
    layer computes what its digital layer computes."""
    from hetcomp.curvature.failures import profile_target

    return dataclasses.replace(profile_target(()), name="ideal-pcm")


def test_mac_greedy_tries_layers_by_macs_and_keeps_those_within_threshold(digits_model, monkeypatch):
    # Whether a layer passes on real PCM depends on the trained weights. On a noise-free PCM it passes by
    # construction: a stage never returns weights that validate worse than those it started from, and the
    # noise-free analog model validates as the digital one does, so every candidate stays at the digital
    # baseline (up to float ties, far inside 2 points), whatever the trained weights are.
    target = register_for_this_test(monkeypatch, ideal_pcm())
    compiled = greedy(digits_model, f"{target}+digital", threshold=0.02)
    log = compiled.manifest.extra["finetune"]
    by_macs = sorted(compiled.manifest.layers, key=lambda layer: -layer["macs"])
    assert [t["candidate"] for t in log["trials"]] == [layer["name"] for layer in by_macs]
    # hand-counted MACs per sample: conv2 16*9*32*64 = 294912 is the largest, fc2 64*10 = 640 the smallest
    assert log["trials"][0]["candidate"] == "conv2" and log["trials"][0]["macs"] == 294912
    assert log["trials"][-1]["candidate"] == "fc2" and log["trials"][-1]["macs"] == 640
    assert all(t["accepted"] and t["drift_val_accuracy"] >= log["baseline_val"] - 0.02 for t in log["trials"])
    assert {layer["assignment"] for layer in compiled.manifest.layers} == {target}
    assert "candidate 1 by MACs" in compiled.manifest.layer("conv2")["reason"]


def test_mac_greedy_reverts_candidates_that_fail(digits_model, monkeypatch):
    noisy = dataclasses.replace(hetcomp.targets.get("pcm"), name="noisy-pcm",
                                device={**hetcomp.targets.get("pcm").device, "out_noise": 50.0})
    register_for_this_test(monkeypatch, noisy)
    # Validation labels are the model's own predictions, so the digital baseline is 1.0 by construction (not
    # whatever accuracy training reached on this machine); output noise 50x the signal is a guess among ten.
    model, data = digits_model
    inputs = torch.cat([batch[0] for batch in data["val"]])
    with torch.no_grad():
        own_labels = model(inputs).argmax(-1)
    compiled = greedy(digits_model, "noisy-pcm+digital", threshold=0.02, val=(inputs, own_labels))
    log = compiled.manifest.extra["finetune"]
    assert log["baseline_val"] >= 0.99  # 1.0 up to float ties between the two forward paths
    assert not any(t["accepted"] for t in log["trials"]) and log["accepted"] == []
    assert all(t["drift_val_accuracy"] < log["baseline_val"] - 0.02 for t in log["trials"])
    assert {layer["assignment"] for layer in compiled.manifest.layers} == {"digital"}
    # every candidate was reverted: the compiled weights are the FP weights
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights(compiled).items())
    assert math.isclose(compiled.manifest.summary["mac_ratio"]["noisy-pcm"], 0.0)


def test_killed_mac_greedy_search_resumes_to_the_same_result(digits_model, tmp_path, monkeypatch):
    from hetcomp.finetune import mac_greedy as greedy_module

    uninterrupted = greedy(digits_model, "pcm+digital", threshold=0.005)
    real_train_stage = greedy_module.train_stage
    calls = []

    def killed_in_trial_3(*args, **kwargs):
        calls.append(kwargs["desc"])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_train_stage(*args, **kwargs)

    monkeypatch.setattr(greedy_module, "train_stage", killed_in_trial_3)
    with pytest.raises(KeyboardInterrupt):
        greedy(digits_model, "pcm+digital", threshold=0.005, checkpoints=tmp_path)
    calls.clear()
    monkeypatch.setattr(greedy_module, "train_stage", lambda *a, **k: calls.append(k["desc"]) or
                        real_train_stage(*a, **k))
    resumed = greedy(digits_model, "pcm+digital", threshold=0.005, checkpoints=tmp_path)
    assert len(calls) == 6 - 2 and calls[0].startswith("mac-greedy 3/6")
    assert [layer["assignment"] for layer in resumed.manifest.layers] == \
        [layer["assignment"] for layer in uninterrupted.manifest.layers]
    assert all(torch.equal(weights(uninterrupted)[k], v) for k, v in weights(resumed).items())
    strip = lambda trials: [{k: v for k, v in t.items() if k != "seconds"} for t in trials]  # noqa: E731
    trials = resumed.manifest.extra["finetune"]["trials"]
    assert strip(trials) == strip(uninterrupted.manifest.extra["finetune"]["trials"])
