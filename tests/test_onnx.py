"""Partitioned ONNX export: onnxruntime equivalence, per-node target tags, split export chaining."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import hetcomp


class TinyTransformer(nn.Module):
    """Image rows as tokens: one attention block (dynamic matmuls) and an MLP."""

    def __init__(self, dim=16, tokens=8, classes=10):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim * tokens, classes)
        self.scale = dim**-0.5

    def forward(self, x):  # [B, 1, 8, 8] -> tokens [B, 8, 8]
        h = self.embed(x.flatten(1, 2))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        h = h + self.out(attention @ v)
        h = h + torch.relu(self.mlp(h))
        return self.head(h.flatten(1))


def run_onnx(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check_export(model, x, tmp_path, strategy):
    compiled = hetcomp.compile(model, "pcm+digital", (x,), strategy=strategy)
    path = compiled.export_onnx(tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    # runs in stock onnxruntime, matches PyTorch (also at another batch size: dynamic batch)
    for batch in (x, torch.randn(5, *x.shape[1:])):
        (got,) = run_onnx(path, {proto.graph.input[0].name: batch.numpy()})
        expected = model(batch).detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # every mapped layer has exactly one compute node, tagged with its layer and target
    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    tags = [{p.key: p.value for p in n.metadata_props} for n in compute]
    by_layer = {}
    for tag in tags:
        by_layer.setdefault(tag.get("hetcomp.layer"), []).append(tag.get("hetcomp.target"))
    expected_targets = {layer["name"]: layer["assignment"] for layer in compiled.manifest.layers}
    assert {k: v for k, v in by_layer.items() if k is not None} == {k: [v] for k, v in expected_targets.items()}
    embedded = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(embedded["hetcomp.manifest"])["layers"][0]["name"] == compiled.manifest.layers[0]["name"]
    return compiled, proto


def test_cnn_export_matches_and_is_tagged(tmp_path, digits_model):
    model, data = digits_model
    x = next(iter(data["test"]))[0][:4]
    compiled, _ = check_export(model, x, tmp_path, "first-last-digital")
    assert compiled.manifest.layer("conv2")["assignment"] == "pcm"


def test_transformer_export_matches_and_is_tagged(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    compiled, proto = check_export(model, torch.randn(3, 1, 8, 8), tmp_path, "all-analog")
    dynamic = [layer for layer in compiled.manifest.layers if layer["kind"] == "dynamic"]
    assert len(dynamic) == 2 and all(layer["assignment"] == "digital" for layer in dynamic)


@pytest.mark.parametrize("strategy", ["first-last-digital", "all-digital"])
def test_split_export_chains_to_the_whole_model(tmp_path, digits_model, strategy):
    model, data = digits_model
    x = next(iter(data["test"]))[0][:4]
    compiled = hetcomp.compile(model, "pcm+digital", (x,), strategy=strategy)
    directory = compiled.export_onnx(tmp_path / "parts", split=True)
    spec = json.loads((directory / "partitions.json").read_text())
    targets = [p["target"] for p in spec["partitions"]]
    assert targets == (["digital", "pcm", "digital"] if strategy == "first-last-digital" else ["digital"])
    values = {spec["inputs"][0]: x.numpy()}
    for part in spec["partitions"]:
        onnx.checker.check_model(onnx.load(str(directory / part["file"])))
        outputs = run_onnx(directory / part["file"], {name: values[name] for name in part["inputs"]})
        values.update(zip(part["outputs"], outputs))
    expected = model(x).detach().numpy()
    np.testing.assert_allclose(values[spec["outputs"][0]], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_partition_graph_orders_partitions_and_refuses_a_cycle():
    from hetcomp.errors import ConfigError
    from hetcomp.export.onnx_export import _partition_graph

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Sigmoid()))
    names = [n.name for n in gm.graph.nodes if n.op == "call_module"]
    graph = _partition_graph(gm, dict(zip(names, [0, 1, 1])), {0: "digital", 1: "pcm"})
    assert list(graph.edges(data="values")) == [(0, 1, [names[0]])]
    # Not contiguous: digital -> pcm -> digital in one partition would need pcm both before and after it.
    with pytest.raises(ConfigError, match=r"cycle \(partition 0 \(digital\) -> 1 \(pcm\) via '_0', partition 1 "
                                          r"\(pcm\) -> 0 \(digital\) via '_1'\).*split=False"):
        _partition_graph(gm, dict(zip(names, [0, 1, 0])), {0: "digital", 1: "pcm"})
