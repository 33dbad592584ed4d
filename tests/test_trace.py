"""Tracing: mappable layers, kinds, rows, params and per-sample MACs against hand counts; trace errors."""

import pytest
import torch
import torch.nn as nn

import hetcomp
from hetcomp.errors import TraceError


def layers_of(model, *inputs):
    gm = hetcomp.trace(model, inputs)
    return {a.layer.name: a.layer for _, a in hetcomp.mappable_nodes(gm)}


class LinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 30)
        self.fc2 = nn.Linear(30, 5, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_linear_macs_params_rows():
    layers = layers_of(LinearNet(), torch.randn(4, 20))
    assert layers["fc1"].macs == 20 * 30 and layers["fc2"].macs == 30 * 5
    assert layers["fc1"].params == 20 * 30 + 30 and layers["fc2"].params == 30 * 5
    assert layers["fc1"].rows == 30 and layers["fc1"].kind == "weight-static"
    assert layers["fc1"].weight_param == "fc1.weight"


def test_linear_on_sequence_counts_every_token():
    # [batch, tokens, features]: each of 7 tokens costs 20*30 MACs.
    layers = layers_of(LinearNet(), torch.randn(2, 7, 20))
    assert layers["fc1"].macs == 7 * 20 * 30


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1)  # out 8x10x10
        self.grouped = nn.Conv2d(8, 12, 3, groups=4)  # out 12x8x8, each output sees 8/4=2 channels
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)  # out 12x8x8, 1 channel
        self.strided = nn.Conv1d(12, 6, 4, stride=2)  # on [12, 64] -> [6, 31]

    def forward(self, x):
        x = self.depthwise(self.grouped(self.plain(x)))
        return self.strided(x.flatten(2))


def test_conv_grouped_depthwise_conv1d_macs():
    layers = layers_of(ConvNet(), torch.randn(2, 3, 10, 10))
    assert layers["plain"].macs == 8 * 10 * 10 * (3 * 9)
    assert layers["grouped"].macs == 12 * 8 * 8 * (2 * 9)
    assert layers["grouped"].groups == 4 and layers["grouped"].weight_shape == (12, 2, 3, 3)
    assert layers["depthwise"].macs == 12 * 8 * 8 * 9
    assert layers["depthwise"].params == 12 * 9
    assert layers["strided"].op == "conv1d" and layers["strided"].macs == 6 * 31 * (12 * 4)
    assert [layers[n].rows for n in ("plain", "grouped", "depthwise", "strided")] == [8, 12, 12, 6]


class Attention(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Parameter(torch.randn(dim, dim))

    def forward(self, x):  # x: [B, T, D]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2)  # [B, T, T], K = D
        context = torch.bmm(scores.softmax(-1), v)  # [B, T, D], K = T
        return torch.matmul(context, self.proj) + nn.functional.linear(context, v.mean(1, keepdim=True)[0])


def test_dynamic_and_static_matmuls():
    layers = layers_of(Attention(), torch.randn(3, 5, 16))
    by_op = sorted((layer.kind, layer.macs) for layer in layers.values())
    # qkv: 5 tokens * 16 * 48; q@k^T: 5*5 outputs * 16; bmm: 5*16 outputs * 5; matmul with a
    # parameter: weight-static 5*16*16; F.linear with an activation weight ([1,16] -> rows 1): 5*1*16.
    assert by_op == sorted([
        ("weight-static", 5 * 16 * 48), ("dynamic", 5 * 5 * 16), ("dynamic", 5 * 16 * 5),
        ("weight-static", 5 * 16 * 16), ("dynamic", 5 * 1 * 16),
    ])
    static_matmul = [layer for layer in layers.values() if layer.op == "matmul" and layer.kind == "weight-static"]
    assert static_matmul[0].weight_param == "proj" and static_matmul[0].rows == 16


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Gate()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.inner(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


def test_untraceable_model_names_module_and_leaf_fix():
    with pytest.raises(TraceError) as err:
        hetcomp.trace(Branchy(), (torch.randn(2, 4),))
    message = str(err.value)
    assert "'inner' (Gate)" in message and "leaf_modules" in message
    gm = hetcomp.trace(Branchy(), (torch.randn(2, 4),), leaf_modules=["inner"])
    assert [a.layer.name for _, a in hetcomp.mappable_nodes(gm)] == ["fc"]
    gm = hetcomp.trace(Branchy(), (torch.randn(2, 4),), leaf_modules=[Gate])
    assert [a.layer.name for _, a in hetcomp.mappable_nodes(gm)] == ["fc"]


def test_no_mappable_layer_is_an_error():
    with pytest.raises(TraceError, match="no mappable layer"):
        hetcomp.trace(nn.Sequential(nn.ReLU(), nn.Tanh()), (torch.randn(2, 3),))


def test_bad_example_inputs():
    with pytest.raises(TraceError, match="example inputs"):
        hetcomp.trace(LinearNet(), (torch.randn(4, 7),))  # wrong feature size
    with pytest.raises(TraceError, match="tensor"):
        hetcomp.trace(LinearNet(), "not a tensor")
    with pytest.raises(TraceError, match="nn.Module"):
        hetcomp.trace(lambda x: x, (torch.randn(1),))
