"""A new device from outside the package: a user module registers a FeFET simulator (its own weight-noise
physics) and a target that uses it, then compiles, lowers, evaluates, saves, loads and exports a model; and a
hardware architect describes a target reusing a built-in simulator as a TOML file, with no Python."""

import importlib
import sys
import textwrap

import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn

import hetcomp
from hetcomp import targets
from hetcomp.errors import ConfigError, TargetError

FEFET_MODULE = textwrap.dedent('''
    """fefet_device: a FeFET crossbar tier, as a user would write it (one file, outside hetcomp)."""
    import torch
    import torch.nn as nn

    from hetcomp.lower import Simulator, register_simulator
    from hetcomp.targets import WEIGHT_STATIC, CostModel, EnergyTerm, Precision, Target, TileGeometry, register


    class FeFETLinear(nn.Module):
        """Weights stored as FeFET polarization states: a static multiplicative spread, drawn at programming."""

        def __init__(self, linear, spread):
            super().__init__()
            self.weight = nn.Parameter(linear.weight.detach().clone())
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
            self.spread = spread
            self.register_buffer("programmed", self.weight.detach().clone())

        def forward(self, x):
            return nn.functional.linear(x, self.programmed, self.bias)


    class FeFETSimulator(Simulator):
        name = "fefet"
        required = ("spread",)
        defaults = {"levels": 16}

        def weight_noise_rel(self, target):
            return self.settings(target)["spread"]

        def lower(self, module, target):
            if not isinstance(module, nn.Linear):
                raise TypeError("this FeFET model lowers nn.Linear only")
            return FeFETLinear(module, self.settings(target)["spread"])

        def program_and_drift(self, module, t_inference):
            scale = module.weight.detach().abs().max()
            module.programmed = module.weight.detach() + module.spread * scale * torch.randn_like(module.weight)


    register_simulator(FeFETSimulator())
    TARGET = register(Target(
        name="fefet", description="FeFET crossbar, 4-bit weights", analog=True, precision=Precision(8, 4, 8),
        tile=TileGeometry(rows=64, cols=64), clock_hz=2e8, supports=frozenset({WEIGHT_STATIC}),
        cost=CostModel(macs_per_second=2e12, terms=(EnergyTerm("array", 0.05, 1.0, "assumed"),)), accuracy_rank=3,
        simulator="fefet", device={"spread": 0.2}))
''')


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def fefet(tmp_path, monkeypatch):
    (tmp_path / "fefet_device.py").write_text(FEFET_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("fefet_device")
    yield module
    from hetcomp.lower import SIMULATORS

    targets.registry.TARGETS.unregister("fefet")
    SIMULATORS.unregister("fefet")
    sys.modules.pop("fefet_device", None)


def test_a_user_device_compiles_lowers_evaluates_saves_loads_and_exports(fefet, tmp_path):
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    compiled = hetcomp.compile(model, "fefet+digital", data=(x, y), strategy="first-last-digital",
                               hessian={"probes": 2, "max_iter": 3, "batches": 1})
    assert compiled.manifest.layer("fc2")["assignment"] == "fefet"
    # the device's physics reaches the Hessian passes: row sensitivity used its weight noise
    row_pass = next(p for p in compiled.manifest.passes if p["name"] == "row_sensitivity")
    assert row_pass["settings"]["gamma"] == 0.2 and row_pass["settings"]["noise_from_target"] == "fefet"
    hni_pass = next(p for p in compiled.manifest.passes if p["name"] == "hni")
    assert hni_pass["settings"]["gamma"] == 0.2 and hni_pass["settings"]["noise_from_target"] == "fefet"
    fc2 = compiled.manifest.layer("fc2")["metrics"]
    sigma = 0.2 * float(model.fc2.weight.detach().abs().max())
    assert fc2["hni"] == pytest.approx(sigma**2 / (2 * 16 * 16) * fc2["hessian_trace"], rel=1e-9)
    assert compiled.lowering["fc2"]["simulator"] == "fefet"
    assert isinstance(compiled.module.get_submodule("fc2"), fefet.FeFETLinear)
    result = compiled.evaluate((x, y), repeats=4, seed=1)
    programmed = [compiled.module.fc2.programmed.clone()]
    from hetcomp.evaluate import hardware_repeat

    for repeat in range(2):
        with hardware_repeat(compiled.module, compiled.lowering, 0.0, 1, repeat):
            programmed.append(compiled.module.fc2.programmed.clone())
    assert not torch.equal(programmed[1], programmed[2])  # each repeat re-programs through the user simulator
    out = compiled.save(tmp_path / "out")
    loaded = hetcomp.load(out, MLP(), (x,))
    assert loaded.evaluate((x, y), repeats=4, seed=1).accuracies == result.accuracies
    assert loaded.manifest.targets[[t["name"] for t in loaded.manifest.targets].index("fefet")][
        "simulator_module"] == "fefet_device"
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    tags = {p.value for node in proto.graph.node for p in node.metadata_props if p.key == "hetcomp.target"}
    assert tags == {"fefet", "digital"}
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x[:2].numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), model(x[:2]), atol=1e-5, rtol=1e-5)


def test_a_bad_device_parameter_is_refused_before_any_work(fefet):
    import dataclasses

    broken = dataclasses.replace(fefet.TARGET, name="fefet-typo", device={"spred": 0.2})
    targets.register(broken)
    try:
        with pytest.raises(ConfigError, match="needs device parameter.*'spread'"):
            hetcomp.compile(MLP(), "fefet-typo+digital", (torch.randn(2, 6),), strategy="all-fefet-typo")
    finally:
        targets.registry.TARGETS.unregister("fefet-typo")


TOML_TARGET = """
name = "rram-6bit"
description = "A 6-bit ReRAM tier described as data (reuses the built-in pim-crossbar simulator)"
analog = true
supports = ["weight-static"]
accuracy_rank = 2
clock_hz = 1e8
simulator = "pim-crossbar"

[precision]
input_bits = 6
weight_bits = 6
output_bits = 8

[tile]
rows = 128
cols = 128
crossbars_per_tile = 32
tiles = 10
cells_per_weight = 3

[cost]
macs_per_second = 1.0e12
static_power_w = 0.1
terms = [{name = "adc", energy_pj = 0.2, events_per_mac = 0.25, source = "assumed"}]

[device]
input_bits = 6
weight_bits = 6
cell_bits = 2
dac_bits = 1
adc_bits = 8
xbar_rows = 128
conductance_noise = {g_min_s = 3.33e-7, g_max_s = 3.33e-4, voltage_v = 0.2, freq_hz = 1e8, temperature_k = 300.0}
"""


def test_a_toml_target_file_needs_no_python(tmp_path):
    path = tmp_path / "rram6.toml"
    path.write_text(TOML_TARGET)
    target = targets.load_file(path)
    try:
        assert target.capacity_weights == 128 * (128 // 3) * 32 * 10
        torch.manual_seed(0)
        model = MLP()
        x = torch.randn(8, 6)
        compiled = hetcomp.compile(model, "rram-6bit+digital", (x,), strategy="first-last-digital")
        assert compiled.manifest.summary["cost"]["per_target"]["rram-6bit"]["macs"] == 16 * 16
        from hetcomp.lower import tier_sim

        with torch.no_grad():
            with tier_sim.ideal():
                torch.testing.assert_close(compiled(x), model(x))
            assert not torch.allclose(compiled(x), model(x), atol=1e-4)  # 6-bit crossbar: not exact
        path.write_text(TOML_TARGET.replace("cell_bits = 2", "cell_bitz = 2"))
        with pytest.raises(ConfigError, match="needs device parameter.*cell_bits"):
            targets.load_file(path, overwrite=True)
        path.write_text("name = [")
        with pytest.raises(TargetError, match="not valid TOML"):
            targets.load_file(path)
    finally:
        targets.registry.TARGETS.unregister("rram-6bit")


def test_the_cli_compiles_for_a_toml_target(tmp_path):
    import json

    from hetcomp.cli import main

    (tmp_path / "rram6.toml").write_text(TOML_TARGET)
    (tmp_path / "mlp_model.py").write_text("import torch.nn as nn\n\n\ndef build():\n"
                                           "    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), "
                                           "nn.ReLU(), nn.Linear(16, 3))\n")
    try:
        assert main(["--quiet", "compile", f"{tmp_path / 'mlp_model.py'}:build", "--target-file",
                     str(tmp_path / "rram6.toml"), "--target", "rram-6bit+digital", "--strategy", "first-last-digital",
                     "--input-shape", "2,6", "--out", str(tmp_path / "out")]) == 0
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert [layer["assignment"] for layer in manifest["layers"]] == ["digital", "rram-6bit", "digital"]
        assert next(t for t in manifest["targets"] if t["name"] == "rram-6bit")["device"]["weight_bits"] == 6
    finally:
        targets.registry.TARGETS.unregister("rram-6bit")


def test_fine_tuning_uses_the_devices_optimizer():
    """The update rule belongs to the device: plain SGD for a simulator that defines none, aihwkit's AnalogSGD
    for PCM tiles."""
    from aihwkit.optim import AnalogSGD

    from hetcomp.lower import Simulator, simulator_named

    parameters = [{"params": [nn.Parameter(torch.zeros(2))], "lr": 0.1}]
    plain = Simulator().optimizer(parameters, lr=0.1, momentum=0.5)
    assert type(plain) is torch.optim.SGD and plain.defaults["momentum"] == 0.5
    assert isinstance(simulator_named("aihwkit").optimizer(parameters, lr=0.1, momentum=0.5), AnalogSGD)
