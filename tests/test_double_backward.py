"""The efficient double backward records a different graph for the same function: its gradients and
Hessian-vector products must equal PyTorch's own, for every convolution geometry."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hetcomp.analysis.double_backward import efficient_double_backward


def _derivatives(model, x, y, fast: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    tangents = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype)
                for i, p in enumerate(params)]
    if fast:
        with efficient_double_backward():
            loss = F.cross_entropy(model(x), y)
    else:
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    full = torch.autograd.grad(grads, params, tangents, retain_graph=True)
    blocks = [torch.autograd.grad(g, p, t, retain_graph=True)[0] for g, p, t in zip(grads, params, tangents)]
    return [loss.detach(), *[g.detach() for g in grads], *full, *blocks]


class Convs(nn.Module):
    def __init__(self, dims: int, stride: int, padding: int, dilation: int, groups: int, bias: bool) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.first = conv(4, 8, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
        self.norm = norm(8)
        self.second = conv(8, 8, 3, padding=1, groups=groups, bias=bias)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.tanh(self.norm(self.first(x)))
        h = F.relu(self.second(h)) + h
        return self.head(h.flatten(2).mean(-1))


@pytest.mark.parametrize("dims,stride,padding,dilation,groups,bias", [
    (2, 1, 1, 1, 1, True), (2, 2, 1, 1, 2, False), (2, 1, 2, 2, 8, True), (1, 2, 0, 1, 4, True), (3, 1, 1, 1, 1, False),
])
def test_gradients_and_hvps_equal_pytorch(dims, stride, padding, dilation, groups, bias):
    torch.manual_seed(dims * 10 + stride)
    model = Convs(dims, stride, padding, dilation, groups, bias).double()
    with torch.no_grad():  # non-trivial running statistics, then the deployed (eval) function
        model.train()
        model(torch.randn(8, 4, *([7] * dims), dtype=torch.float64))
        model.eval()
    x, y = torch.randn(5, 4, *([7] * dims), dtype=torch.float64), torch.randint(0, 5, (5,))
    for ours, theirs in zip(_derivatives(model, x, y, True), _derivatives(model, x, y, False)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_calls_it_cannot_take_are_left_to_pytorch():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bn = nn.BatchNorm2d(3).double().train()
    with efficient_double_backward():
        ours = F.conv2d(x, w, padding=1)
        same = F.conv2d(x, w, padding="same")  # string padding: PyTorch's own op
        unbatched = F.conv2d(x[0], w, padding=1)  # unbatched input
        normed = bn(x)  # training mode: batch statistics, not the affine map
    assert type(ours.grad_fn).__name__ == "_ConvolutionBackward"
    assert type(same.grad_fn).__name__ == "ConvolutionBackward0"
    assert type(unbatched.grad_fn).__name__ == "SqueezeBackward1"  # PyTorch unsqueezes, convolves, squeezes
    torch.testing.assert_close(same, ours)
    torch.testing.assert_close(unbatched, ours[0])
    assert type(normed.grad_fn).__name__ == "NativeBatchNormBackward0"
