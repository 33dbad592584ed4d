"""Save and load as one unit: compile/apply leave the caller's model alone, the output folder is swapped in
whole, weights are safetensors checked against the manifest, and a saved compile loads in another process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import hetcomp
from hetcomp.errors import ConfigError, ManifestError

SMALL_HESSIAN = {"probes": 2, "max_iter": 3, "batches": 1}


class Net(nn.Module):
    """Conv + BatchNorm + dropout: the pieces whose state or randomness train mode changes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def net_and_data(seed=0):
    torch.manual_seed(seed)
    model = Net()
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 3, (32,))
    return model, x, y


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_compile_and_apply_leave_a_train_mode_model_untouched(tmp_path):
    model, x, y = net_and_data()
    model.train()
    before = snapshot(model)
    compiled = hetcomp.compile(model, "pcm+digital", data=(x, y), hessian=SMALL_HESSIAN)
    assert model.training and all(m.training for m in model.modules())
    assert_same_state(before, model)  # BatchNorm running statistics included
    # The fingerprint is of the model as given: its eval-mode function, statistics unchanged.
    assert compiled.manifest.model["weights"] == hetcomp.manifest.weights_hash(model)
    assert not compiled.graph.training
    torch.testing.assert_close(compiled.graph(x), compiled.graph(x))  # dropout off
    torch.testing.assert_close(compiled.graph(x), model.eval()(x))
    model.train()
    compiled.save(tmp_path / "out")
    applied = hetcomp.apply_manifest(model, tmp_path / "out", (x,))
    loaded = hetcomp.load(tmp_path / "out", model, (x,))
    assert model.training
    assert_same_state(before, model)
    assert not applied.graph.training and not loaded.graph.training


class ScaleWeights(hetcomp.Pass):
    """Changes weights, as fine-tuning does, by a known amount (so the test does not depend on training)."""

    name = "scale_weights"

    def run(self, gm, ctx):
        with torch.no_grad():
            gm.fc1.weight.mul_(1.5)
        return gm


def test_load_gives_the_compiled_weights_and_apply_manifest_refuses_the_originals(tmp_path):
    model, x, y = net_and_data()
    compiled = hetcomp.compile(model, "pcm+digital", (x,), strategy="first-last-digital", passes=[ScaleWeights()])
    assert compiled.manifest.finetuned
    out = compiled.save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [".hetcomp-output", "manifest.json", "model.onnx",
                                                     "weights.safetensors"]
    loaded = hetcomp.load(out, Net(), (x,))  # any weights: the architecture comes from the model
    torch.testing.assert_close(loaded.graph.fc1.weight, model.fc1.weight * 1.5, rtol=0, atol=0)
    with pytest.raises(ManifestError, match="fine-tuned the weights.*hetcomp.load"):
        hetcomp.apply_manifest(model, out, (x,))
    # A model that already holds the compiled weights (e.g. loaded from weights.safetensors) is accepted.
    tuned = Net()
    tuned.load_state_dict(load_file(out / "weights.safetensors"))
    applied = hetcomp.apply_manifest(tuned, out, (x,))
    torch.testing.assert_close(applied.graph(x), compiled.graph(x))


def test_load_after_laft_is_the_saved_compiled_model(tmp_path):
    model, x, y = net_and_data()
    laft = hetcomp.LAFT(epochs=2, patience=2, val_repeats=1, lr_analog=0.05, lr_digital=0.05, checkpoint_dir=None,
                        batch_size=16)
    compiled = hetcomp.compile(model, "pcm+digital", data=(x, y), strategy="first-last-digital",
                               hessian=SMALL_HESSIAN, finetune=laft, seed=1)
    out = compiled.save(tmp_path / "out")
    loaded = hetcomp.load(out, Net(), (x,))
    for key, value in compiled.graph.state_dict().items():
        assert torch.equal(loaded.graph.state_dict()[key], value), key
    assert loaded.manifest.to_dict() == compiled.manifest.to_dict()
    assert {k: v["simulator"] for k, v in loaded.lowering.items()} == {
        k: v["simulator"] for k, v in compiled.lowering.items()}
    assert loaded.evaluate((x, y), repeats=3, seed=5).accuracies == compiled.evaluate((x, y), repeats=3,
                                                                                        seed=5).accuracies


def test_tampered_or_broken_weights_are_refused(tmp_path):
    model, x, y = net_and_data()
    out = hetcomp.compile(model, "pcm+digital", (x,), strategy="first-last-digital").save(tmp_path / "out")
    weights = out / "weights.safetensors"
    state = load_file(weights)
    state["fc1.weight"][0, 0] += 1e-3
    save_file(state, weights)
    with pytest.raises(ManifestError, match="does not match the manifest's compiled_weights"):
        hetcomp.load(out, Net(), (x,))
    weights.write_bytes(b"")
    with pytest.raises(ManifestError, match="not a valid safetensors file"):
        hetcomp.load(out, Net(), (x,))
    del state["fc2.bias"]
    save_file(state, weights)
    with pytest.raises(ManifestError, match="missing \\['fc2.bias'\\]"):
        hetcomp.load(out, Net(), (x,))
    weights.unlink()
    with pytest.raises(ManifestError, match="no weights.safetensors"):
        hetcomp.load(out, Net(), (x,))
    assert b"pickle" not in (out / "manifest.json").read_bytes()


def test_save_replaces_the_folder_whole_with_umask_modes(tmp_path):
    model, x, _ = net_and_data()
    first = hetcomp.compile(model, "pcm+digital", (x,), strategy="first-last-digital")
    out = tmp_path / "out"
    first.save(out, split_onnx=True)
    assert (out / "model.onnx").exists() and any((out / "onnx").glob("*.onnx"))
    other, _, _ = net_and_data(seed=1)
    second = hetcomp.compile(other, "pcm+digital", (x,), strategy="all-digital")
    old_umask = os.umask(0o027)
    try:
        second.save(out, onnx=False)
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == [".hetcomp-output", "manifest.json", "weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert json.loads((out / "manifest.json").read_text())["strategy"] == "all-digital"
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o640, path
    assert out.stat().st_mode & 0o777 == 0o750


def test_save_refuses_a_folder_that_is_not_hetcomp_output(tmp_path):
    model, x, _ = net_and_data()
    compiled = hetcomp.compile(model, "pcm+digital", (x,), strategy="all-digital")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"not empty and is not \(only\) an earlier hetcomp output"):
        compiled.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


SAVER = textwrap.dedent("""
    import sys, torch, torch.nn as nn
    sys.path.insert(0, {tests!r})
    import hetcomp
    from test_save_load import Net, net_and_data
    compiled = []
    for seed in (1, 2):
        model, x, _ = net_and_data(seed)
        compiled.append(hetcomp.compile(model, "pcm+digital", (x,), strategy="first-last-digital"))
    print("ready", flush=True)
    while True:
        for c in compiled:
            c.save({out!r})
""")


def test_a_killed_save_leaves_the_old_or_the_new_output(tmp_path):
    """SIGKILL a process that keeps saving two different compiles: the folder always loads, and its manifest,
    weights and ONNX always belong to the same compile."""
    out = tmp_path / "out"
    _, x, _ = net_and_data()
    hetcomp.compile(net_and_data(3)[0], "pcm+digital", (x,), strategy="first-last-digital").save(out)
    script = SAVER.format(tests=os.path.dirname(__file__), out=str(out))
    for attempt in range(4):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.37 * attempt)  # somewhere inside a save
        child.send_signal(signal.SIGKILL)
        child.wait()
        loaded = hetcomp.load(out, Net(), (x,))  # checks the weights against this manifest
        import onnx

        onnx_manifest = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}["hetcomp.manifest"]
        assert json.loads(onnx_manifest)["model"] == loaded.manifest.model
        assert sorted(p.name for p in out.iterdir()) == [".hetcomp-output", "manifest.json", "model.onnx",
                                                     "weights.safetensors"]


def fefet_target(simulator, spread=0.3):
    from hetcomp.targets import WEIGHT_STATIC, CostModel, Precision, Target, TileGeometry

    return Target(name="fefet", description="FeFET crossbar (a user's target)", analog=True,
                  precision=Precision(8, 4, 8), tile=TileGeometry(rows=64, cols=64), clock_hz=None,
                  supports=frozenset({WEIGHT_STATIC}), cost=CostModel(macs_per_second=1e12), accuracy_rank=4,
                  simulator=simulator, device={"spread": spread} if simulator else {})


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


LOADER = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    {imports}
    import hetcomp
    from test_save_load import MLP
    x, y = torch.load({data!r}, weights_only=True)
    try:
        loaded = hetcomp.load({out!r}, MLP(), (x,))
    except hetcomp.HetcompError as err:
        print(json.dumps({{"error": str(err)}}))
    else:
        print(json.dumps({{"accuracies": loaded.evaluate((x, y), repeats=3, seed=2).accuracies,
                          "targets": str(loaded.targets)}}))
""")


def run_loader(tmp_path, out, data, imports=""):
    script = LOADER.format(tests=os.path.dirname(__file__), out=str(out), data=str(data), imports=imports)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_user_target_loads_in_a_process_that_never_registered_it(tmp_path):
    from test_external_target import FEFET_MODULE  # the user's device module of that test

    (tmp_path / "fefet_device.py").write_text(FEFET_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import fefet_device  # noqa: F401  (registers the simulator in this process)
    finally:
        sys.path.remove(str(tmp_path))
    try:
        check_user_target_round_trips(tmp_path)
    finally:
        from hetcomp.lower import SIMULATORS

        hetcomp.targets.registry.TARGETS.unregister("fefet")
        SIMULATORS.unregister("fefet")
        sys.modules.pop("fefet_device", None)


def check_user_target_round_trips(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    torch.save((x, y), tmp_path / "data.pt")
    for simulator, name in ((None, "as-data"), ("fefet", "with-code")):
        compiled = hetcomp.compile(MLP(), fefet_target(simulator), (x,), strategy="all-fefet")
        expected = compiled.evaluate((x, y), repeats=3, seed=2).accuracies
        out = compiled.save(tmp_path / name)
        record = json.loads((out / "manifest.json").read_text())["targets"][0]
        assert record["name"] == "fefet" and record["cost"]["macs_per_second"] == 1e12
        if simulator is None:
            assert run_loader(tmp_path, out, tmp_path / "data.pt") == {"accuracies": expected, "targets": "fefet"}
        else:
            assert record["simulator_module"] == "fefet_device"
            refused = run_loader(tmp_path, out, tmp_path / "data.pt")
            assert "fefet" in refused["error"] and "import fefet_device" in refused["error"]
            loaded = run_loader(tmp_path, out, tmp_path / "data.pt", imports="import fefet_device")
            assert loaded["accuracies"] == expected
            assert compiled.lowering["fc1"]["simulator"] == "fefet"
