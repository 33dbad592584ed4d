"""Nothing in a manifest is trusted: schema, layer-by-layer agreement with the model, valid assignments,
derived figures recomputed; every malformed file is a ManifestError."""

import copy
import json

import pytest
import torch
import torch.nn as nn

import hetcomp
from hetcomp.errors import ManifestError
from hetcomp.manifest import Manifest
from hetcomp.targets import get


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):  # [B, T, 8]
        h = self.fc2(torch.relu(self.fc1(x)))
        mixed = torch.softmax(h @ x.transpose(1, 2), -1) @ x
        return self.out(mixed.mean(1))


X = torch.randn(4, 5, 8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Attention()
    compiled = hetcomp.compile(model, "pcm+digital", (X,), strategy="first-last-digital")
    return model, compiled.manifest.to_dict()


def layer(data, name):
    return next(record for record in data["layers"] if record["name"] == name)


def set_assignment(value, name="fc2"):
    def edit(data):
        layer(data, name)["assignment"] = value
    return edit


def split_fc2(counts, codes):
    def edit(data):
        record = layer(data, "fc2")
        record["assignment"] = counts
        record["row_tiers"] = {"tiers": ["digital", "pcm"], "codes": codes}
    return edit


def drop(key):
    return lambda data: data.pop(key)


def set_key(key, value):
    return lambda data: data.__setitem__(key, value)


def truncate_layers(data):
    data["layers"] = data["layers"][:-1]


def duplicate_layer(data):
    data["layers"].append(copy.deepcopy(data["layers"][0]))


def edit_shape(data):
    layer(data, "fc1")["shape"] = [16, 9]


def edit_macs(data):
    layer(data, "fc1")["macs"] += 1


def matmul_name(data):
    return next(record["name"] for record in data["layers"] if record["kind"] == "dynamic")


def dynamic_on_pcm(data):
    layer(data, matmul_name(data))["assignment"] = "pcm"


def foreign_target_definition(data):
    data["targets"][0]["supports"] = ["teleport"]


BAD = [
    ("unknown target", set_assignment("foo"), "'foo', which is not in the manifest's target set"),
    ("null target", set_assignment(None), "malformed at layers/.*assignment"),
    ("numeric target", set_assignment(42), "malformed at layers/.*assignment"),
    ("target outside the set", set_assignment("sram"), "'sram', which is not in the manifest's target set"),
    ("dynamic op on pcm", dynamic_on_pcm, "does not run dynamic ops"),
    ("rows do not sum", split_fc2({"digital": 3, "pcm": 4}, "0001111"), "sum to 7, not its 8 rows"),
    ("row tiers disagree", split_fc2({"digital": 4, "pcm": 4}, "00011111"), "row_tiers do not give"),
    ("row tiers missing", set_assignment({"digital": 4, "pcm": 4}), "row_tiers do not give"),
    ("truncated layer list", truncate_layers, "only in the model: \\[.out.\\]"),
    ("duplicated layer", duplicate_layer, "more than once"),
    ("empty layer list", set_key("layers", []), "malformed at layers"),
    ("edited target_set", set_key("target_set", "digital+sram"), "does not match its target definitions"),
    ("target_set missing a target", set_key("target_set", "pcm"), "does not match its target definitions"),
    ("layer shape edited", edit_shape, "layer 'fc1' shape \\[16, 9\\] in the manifest, \\[16, 8\\] in the model"),
    ("layer MACs edited", edit_macs, "layer 'fc1' macs"),
    ("malformed target definition", foreign_target_definition, "malformed at targets/0/supports"),
    ("missing seed", drop("seed"), "'seed' is a required property"),
    ("negative seed", set_key("seed", -1), "malformed at seed"),
    ("old schema", set_key("schema_version", 1), "schema_version 1 is not supported"),
    ("metrics of the wrong type", lambda d: layer(d, "fc1").__setitem__("metrics", [1, 2]), "malformed at layers"),
]


@pytest.mark.parametrize("description, edit, message", BAD, ids=[case[0] for case in BAD])
def test_a_bad_manifest_is_refused_with_its_cause(saved, tmp_path, description, edit, message):
    model, good = saved
    data = copy.deepcopy(good)
    edit(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        hetcomp.apply_manifest(model, path, (X,))


@pytest.mark.parametrize("content", [b"[]", b"null", b"\xff\xfe\x00garbage", b"[" * 100_000, b"{\"schema_version\": 2}",
                                     b""], ids=["list", "null", "not-utf8", "deep", "nearly-empty", "empty"])
def test_a_malformed_file_is_a_manifest_error(tmp_path, content):
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    with pytest.raises(ManifestError):
        Manifest.load(path)


def test_a_stale_summary_is_recomputed_not_trusted(saved, tmp_path):
    model, good = saved
    data = copy.deepcopy(good)
    data["summary"]["mac_ratio"] = {"digital": 0.0, "pcm": 1.0}
    data["summary"]["cost"] = {"latency_s": 0.0}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    applied = hetcomp.apply_manifest(model, tmp_path / "manifest.json", (X,))
    assert applied.manifest.summary == good["summary"]
    assert applied.evaluate((X, torch.zeros(4, dtype=torch.long)), repeats=1).mac_ratio == pytest.approx(
        good["summary"]["mac_ratio"]["pcm"])


def test_a_hand_edited_assignment_is_applied_and_summarised(saved, tmp_path):
    """Editing a layer's target by hand (a valid edit) is honoured, and the figures follow it."""
    model, good = saved
    data = copy.deepcopy(good)
    split_fc2({"digital": 5, "pcm": 3}, "00101010")(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    applied = hetcomp.apply_manifest(model, tmp_path / "manifest.json", (X,))
    fc2 = applied.manifest.layer("fc2")
    assert fc2["assignment"] == {"digital": 5, "pcm": 3}
    pcm_macs = 3 / 8 * fc2["macs"] + sum(r["macs"] for r in data["layers"]
                                        if r["assignment"] == "pcm")
    total = sum(r["macs"] for r in data["layers"])
    assert applied.manifest.summary["mac_ratio"]["pcm"] == pytest.approx(pcm_macs / total)


def test_summary_cost_by_hand():
    """first-last-digital on the attention model: hand-computed latency and energy (H3PIMAP Eq. 2 with one tier
    per layer: layer times add up)."""
    torch.manual_seed(0)
    compiled = hetcomp.compile(Attention(), "pcm+digital", (X,), strategy="first-last-digital")
    layers = compiled.manifest.layers
    # Per sample: fc1 5*8*16, fc2 5*16*8, scores 5*8*5, context 5*5*8, out 8*3 MACs.
    macs = {r["name"]: r["macs"] for r in layers}
    assert sorted(macs.values()) == sorted([640, 640, 200, 200, 24])
    digital, pcm = get("digital").cost, get("pcm").cost
    on_pcm = sum(r["macs"] for r in layers if r["assignment"] == "pcm")
    on_digital = sum(macs.values()) - on_pcm
    assert on_pcm == 640  # fc2: first (fc1) and last (out) stay digital, matmuls need digital
    cost = compiled.manifest.summary["cost"]
    latency = on_digital / 1.024e12 + on_pcm / 8.05e12  # digital 1024 MAC x 1 GHz; HERMES 16.1 TOPS
    energy = on_digital * (4.6 + 5.0 * 2 / 32) * 1e-12 + on_pcm * 0.806e-12
    assert cost["latency_s"] == pytest.approx(latency, rel=1e-12)
    assert cost["energy_j"] == pytest.approx(energy, rel=1e-12)
    assert cost["per_target"]["pcm"]["busy_s"] == pytest.approx(pcm.latency_s(640))
    assert cost["per_target"]["digital"]["energy_j"] == pytest.approx(float(digital.energy_j(on_digital)))


def bad_definition(change):
    def edit(data):
        target = next(t for t in data["targets"] if t["name"] == "pcm")
        change(target)
    return edit


@pytest.mark.parametrize("change, message", [
    (lambda t: t["tile"].__setitem__("cells_per_weight", 0), "tile.cells_per_weight must be an integer >= 1"),
    (lambda t: t["precision"].__setitem__("input_bits", "8"), "precision.input_bits must be an integer"),
    (lambda t: t["precision"].__setitem__("output_bits", 1), "aihwkit needs precision.output_bits >= 2"),
    (lambda t: t["device"].__setitem__("g_maks", 25.0), "unknown device parameter.*'g_maks'"),
], ids=["zero cells per weight", "bits as a string", "1-bit aihwkit converter", "misspelt device parameter"])
def test_a_bad_target_definition_is_a_manifest_error(saved, tmp_path, change, message):
    model, good = saved
    data = copy.deepcopy(good)
    bad_definition(change)(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        hetcomp.apply_manifest(model, tmp_path / "manifest.json", (X,))
