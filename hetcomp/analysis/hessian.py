"""Hessian-vector products of the loss w.r.t. layer weights, and the estimators built on them.

One ``HessianOperator`` per (model, data): each calibration batch's gradient graph is built once
(``create_graph=True``) and reused by every probe and power iteration. Never forms a Hessian.

Estimators (all layers at once):
- ``hutchinson``: Tr(H_l) and diag(H_l) from Rademacher probes. ``estimator="full"`` draws one probe
  over all layers and does one full-model HVP per probe: v_l . (Hv)_l is unbiased for Tr(H_ll) because
  cross-layer terms vanish in expectation, but they add variance (sum_{k!=l} ||H_lk||_F^2 per probe).
  ``estimator="block"`` probes one layer at a time (L HVPs per probe): the variance of Tr(H_ll)'s
  estimate is only 2 * sum_{i!=j} (H_ll)_ij^2, at L times the cost.
- ``power_iteration``: lambda_max of every block H_ll, batched across layers, stopped per layer when
  the relative change of its Rayleigh quotient falls under ``tol``.
- ``lanczos``: the same eigenvalue from the Lanczos tridiagonal's dominant Ritz value, same stopping
  rule; fewer HVPs for the same tolerance.

Opt-in on CUDA (``cuda_graphs=True``): each calibration batch's forward, gradient and HVPs are
captured once in a CUDA graph and replayed per probe / power iteration; the block graph computes
every layer's H_ll v_l in one replay (power iteration advances all layers in lockstep). Measured on
an H100 (bench/results/): it halves the time for the launch-bound digits CNN (block estimator 0.28 s
-> 0.14 s), but ResNet-20 at batch 128 is *not* launch-bound (full HVP 27.7 ms eager vs 29.2 ms
replayed; all 22 block HVPs 169 vs 143 ms), so capture cost and the lockstep sweep over converged
layers made it slower there (3.21 s -> 4.87 s). Hence off by default. Capture failure (an op that
cannot be captured) falls back to the eager path.

Optionally (``batched=True``) HVPs are batched with ``torch.autograd.grad(..., is_grads_batched=True)``
(vmap over tangents). Measured, it loses on both devices for these models, so the loop is the default:
ResNet-20, batch 32, 2-core CPU: power iteration 13.7 s looped vs 69 s vmapped; batch 128 on an H100:
full-estimator run 1.92 s looped vs 5.89 s vmapped (bench/results/). A looped block HVP
``grad(g_l, w_l)`` prunes the double-backward graph to what layer l needs; vmap over one-hot layer
tangents does the full-model work for every layer. Where an op has no batching rule the operator
falls back to the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from hetcomp.progress import bar, progress

Batch = tuple[torch.Tensor, torch.Tensor]


class HessianOperator:
    """The loss Hessian w.r.t. ``params``, averaged over ``batches`` (weighted by batch size)."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        batches: Sequence[Batch],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batched: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        if not params:
            raise ValueError("HessianOperator needs at least one parameter tensor")
        self.params = list(params)
        self.batched = batched
        self.hvp_calls = 0
        self.ritz_vectors: dict[int, torch.Tensor] = {}  # filled by lanczos(..., keep_vectors=True)
        self.cuda_graphs = cuda_graphs
        if self.cuda_graphs and not self.params[0].is_cuda:
            raise ValueError("cuda_graphs=True needs the parameters on a CUDA device")
        self._model, self._loss_fn = model, loss_fn
        was_training = model.training
        model.eval()  # BatchNorm running stats, no dropout: the deployed function's curvature
        total = sum(int(y.shape[0]) for _, y in batches)
        self._batches = [(inputs, targets, int(targets.shape[0]) / total) for inputs, targets in batches]
        self._graphs: list[tuple[tuple[torch.Tensor, ...], float]] = []
        self._captured: dict[str, list[tuple[_CapturedHVP, float]]] = {}
        self.gradient = [torch.zeros_like(p) for p in self.params]
        self.loss = 0.0
        with torch.enable_grad():
            for inputs, targets, weight in self._batches:
                loss = loss_fn(model(inputs), targets)
                # The captured graphs rebuild the double-backward graph themselves: keep none here.
                grads = torch.autograd.grad(loss, self.params, create_graph=not self.cuda_graphs)
                if not self.cuda_graphs:
                    self._graphs.append((grads, weight))
                for accumulated, g in zip(self.gradient, grads):
                    accumulated.add_(g.detach(), alpha=weight)
                self.loss += weight * float(loss.detach())
        model.train(was_training)

    def _eager_graphs(self) -> None:
        """Build the retained gradient graphs of the eager path (after a failed capture)."""
        was_training = self._model.training
        self._model.eval()
        with torch.enable_grad():
            for inputs, targets, weight in self._batches:
                loss = self._loss_fn(self._model(inputs), targets)
                self._graphs.append((torch.autograd.grad(loss, self.params, create_graph=True), weight))
        self._model.train(was_training)

    def _replay(self, mode: str, vectors: dict[int, torch.Tensor]) -> list[torch.Tensor] | None:
        """Weighted sum over batches of the captured HVP graph's outputs; None when capture failed."""
        if mode not in self._captured:
            try:
                was_training = self._model.training
                self._model.eval()
                self._captured[mode] = [(_CapturedHVP(self._model, self.params, x, y, self._loss_fn, mode), weight)
                                        for x, y, weight in self._batches]
                self._model.train(was_training)
            except RuntimeError:
                self.cuda_graphs = False  # an op that cannot be captured: eager from now on
                self._captured.clear()
                self._eager_graphs()
                return None
        result = None
        for captured, weight in self._captured[mode]:
            outputs = captured.replay(vectors)
            if result is None:
                result = [out * weight for out in outputs]
            else:
                for acc, out in zip(result, outputs):
                    acc.add_(out, alpha=weight)
        return result

    # -- HVPs ---------------------------------------------------------------------------------------
    def hvp(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Full-model H v for one vector given per parameter."""
        if self.cuda_graphs:
            replayed = self._replay("full", dict(enumerate(vectors)))
            if replayed is not None:
                self.hvp_calls += 1
                return replayed
        result = [torch.zeros_like(p) for p in self.params]
        for grads, weight in self._graphs:
            parts = torch.autograd.grad(grads, self.params, grad_outputs=list(vectors), retain_graph=True)
            for acc, part in zip(result, parts):
                acc.add_(part, alpha=weight)
        self.hvp_calls += 1
        return result

    def hvp_many(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Full-model H v for a batch of vectors: each tensor has a leading probe dimension."""
        count = vectors[0].shape[0]
        if self.batched and count > 1 and not self.cuda_graphs:
            try:
                result = [torch.zeros_like(v) for v in vectors]
                for grads, weight in self._graphs:
                    parts = torch.autograd.grad(
                        grads, self.params, grad_outputs=list(vectors), retain_graph=True,
                        is_grads_batched=True,
                    )
                    for acc, part in zip(result, parts):
                        acc.add_(part, alpha=weight)
                self.hvp_calls += count
                return result
            except RuntimeError:
                self.batched = False  # no batching rule for some op: loop from now on
        columns = [self.hvp([v[i] for v in vectors]) for i in progress(range(count), "Hessian probes", count)]
        return [torch.stack([col[j] for col in columns]) for j in range(len(self.params))]

    def block_hvp(self, vectors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """H_ll v_l for each layer index l given (the diagonal blocks only)."""
        indices = list(vectors)
        if self.cuda_graphs:
            replayed = self._replay("block", vectors)
            if replayed is not None:
                self.hvp_calls += len(indices)
                return {layer: replayed[layer] for layer in indices}
        if self.batched and len(indices) > 1:
            # One vmapped backward over one-hot layer tangents: tangent i is v_l in block l, 0 elsewhere.
            tangents = []
            for j, p in enumerate(self.params):
                stacked = torch.zeros((len(indices), *p.shape), dtype=p.dtype, device=p.device)
                if j in vectors:
                    stacked[indices.index(j)] = vectors[j]
                tangents.append(stacked)
            full = self.hvp_many(tangents)
            if self.batched:
                return {layer: full[layer][i] for i, layer in enumerate(indices)}
        result = {}
        for layer in indices:
            out = torch.zeros_like(self.params[layer])
            for grads, weight in self._graphs:
                (part,) = torch.autograd.grad(
                    grads[layer], self.params[layer], grad_outputs=vectors[layer], retain_graph=True
                )
                out.add_(part, alpha=weight)
            self.hvp_calls += 1
            result[layer] = out
        return result

    # -- estimators ---------------------------------------------------------------------------------
    def hutchinson(
        self, probes: int, generator: torch.Generator, estimator: str = "full",
        deflate: dict[int, torch.Tensor] | None = None,
    ) -> HutchinsonResult:
        """Tr(H_ll) and diag(H_ll) for every layer from ``probes`` Rademacher probes.

        ``deflate``: a unit vector y_l per layer (the dominant Ritz vector from ``lanczos(...,
        keep_vectors=True)``). With P = I - y y^T, Tr(H) = y^T H y + Tr(P H P) exactly, for any unit y:
        y^T H y costs one block HVP, and Hutchinson estimates only Tr(P H P), from probes P v. Still
        unbiased; its variance 2 ||P H P||_F^2 (off-diagonal) no longer contains the top eigenvalue's
        lambda_1^2, which carries 30-100% of ||H_ll||_F^2 on the measured models. diag(H) is recovered
        exactly as diag(P H P) + 2 y * (H y) - (y^T H y) y * y.
        """
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        samples = torch.zeros(probes, len(self.params), dtype=torch.float64)
        diag = [torch.zeros_like(p) for p in self.params]
        offset = torch.zeros(len(self.params), dtype=torch.float64)
        if deflate is not None:
            missing = set(range(len(self.params))) - set(deflate)
            if missing:
                raise ValueError(f"deflate needs a vector for every layer; missing {sorted(missing)}")
            hy = self.block_hvp(dict(deflate))
            for layer, y in deflate.items():
                rayleigh = float((y * hy[layer]).sum())
                offset[layer] = rayleigh
                diag[layer] = 2 * y * hy[layer] - rayleigh * y * y

        def project(layer: int, v: torch.Tensor) -> torch.Tensor:
            if deflate is None:
                return v
            y = deflate[layer]
            return v - y * (v * y).flatten(-y.dim()).sum(-1).reshape(v.shape[: v.dim() - y.dim()] + (1,) * y.dim())

        if estimator == "full":
            vectors = [project(layer, _rademacher((probes, *p.shape), p, generator))
                       for layer, p in enumerate(self.params)]
            products = self.hvp_many(vectors)
            for layer, (v, hv) in enumerate(zip(vectors, products)):
                vhv = v * hv
                samples[:, layer] = vhv.flatten(1).sum(1).double().cpu()
                diag[layer] += vhv.mean(0)
        elif estimator == "block":
            for k in progress(range(probes), "Hessian probes (per layer)", probes):
                vectors = {layer: project(layer, _rademacher(p.shape, p, generator))
                           for layer, p in enumerate(self.params)}
                products = self.block_hvp(vectors)
                for layer, hv in products.items():
                    vhv = vectors[layer] * hv
                    samples[k, layer] = float(vhv.sum())
                    diag[layer] += vhv / probes
        else:
            raise ValueError(f"estimator must be 'full' or 'block', got {estimator!r}")
        return HutchinsonResult(samples=samples + offset, diag=diag)

    def power_iteration(
        self, max_iter: int, tol: float, generator: torch.Generator
    ) -> tuple[list[float], list[int]]:
        """Dominant eigenvalue of each block H_ll (Rayleigh quotient) and the iterations it took."""
        vectors = self._random_unit_vectors(generator)
        previous = [0.0] * len(self.params)

        def step(layer: int, hv: torch.Tensor, count: int) -> tuple[float, bool]:
            rayleigh = float((vectors[layer] * hv).sum())
            converged = count > 1 and abs(rayleigh - previous[layer]) <= tol * max(abs(previous[layer]), 1e-30)
            previous[layer] = rayleigh
            norm = hv.norm()
            if not (converged or norm == 0):
                vectors[layer] = hv / norm
            return rayleigh, bool(converged or norm == 0)

        return self._lockstep(vectors, max_iter, "power iteration", step)

    def lanczos(self, max_iter: int, tol: float, generator: torch.Generator, keep_vectors: bool = False
                ) -> tuple[list[float], list[int]]:
        """Dominant eigenvalue of each block H_ll by Lanczos, all layers in lockstep. Same HVP per step as
        power iteration, but the Krylov space converges much faster when the top eigenvalues are close.

        Stops per layer when the Ritz pair's residual ||H y - theta y|| = beta_k |s_k| falls under
        ``tol * |theta|``: an a-posteriori bound (some eigenvalue lies within the residual of theta),
        not the change between steps, which stagnates and stopped too early on a ResNet-20 layer
        (measured: 8.48 after 4 steps vs 9.64 converged).

        Plain three-term recurrence without re-orthogonalisation: loss of orthogonality only adds
        spurious copies of converged Ritz values, which does not change the dominant one, and memory
        stays at three vectors per layer. ``keep_vectors=True`` also keeps the Krylov basis (one vector per
        step) to form each layer's dominant Ritz vector, left in ``self.ritz_vectors`` (unit norm), which
        deflated Hutchinson uses.
        """
        current = self._random_unit_vectors(generator)
        previous = {layer: torch.zeros_like(p) for layer, p in enumerate(self.params)}
        alphas: dict[int, list[float]] = {layer: [] for layer in current}
        betas: dict[int, list[float]] = {layer: [] for layer in current}
        basis: dict[int, list[torch.Tensor]] = {layer: [] for layer in current}
        self.ritz_vectors = {}

        def step(layer: int, hv: torch.Tensor, count: int) -> tuple[float, bool]:
            if keep_vectors:
                basis[layer].append(current[layer])
            alpha = float((current[layer] * hv).sum())
            residual = hv - alpha * current[layer]
            if betas[layer]:
                residual -= betas[layer][-1] * previous[layer]
            alphas[layer].append(alpha)
            value, last_component = _dominant_ritz(alphas[layer], betas[layer])
            beta = float(residual.norm())
            converged = beta * abs(last_component) <= tol * max(abs(value), 1e-30)
            done = converged or beta <= 1e-12 * max(abs(value), 1e-30)  # converged, or an invariant subspace
            if keep_vectors and (done or count == max_iter):
                coefficients = _dominant_ritz_vector(alphas[layer], betas[layer])
                ritz = sum(float(c) * q for c, q in zip(coefficients, basis[layer]))
                self.ritz_vectors[layer] = _unit(ritz)
                basis[layer] = []
            if done:
                return value, True
            betas[layer].append(beta)
            previous[layer], current[layer] = current[layer], residual / beta
            return value, False

        return self._lockstep(current, max_iter, "Lanczos", step)

    def _random_unit_vectors(self, generator: torch.Generator) -> dict[int, torch.Tensor]:
        # Drawn on the CPU generator so results are identical on every device for the same seed.
        return {layer: _unit(torch.randn(p.shape, generator=generator, device="cpu").to(p))
                for layer, p in enumerate(self.params)}

    def _lockstep(self, vectors: dict[int, torch.Tensor], max_iter: int, desc: str,
                  step: Callable[[int, torch.Tensor, int], tuple[float, bool]]) -> tuple[list[float], list[int]]:
        """Run an iterative eigensolver on every layer at once: each round, one block HVP per unconverged
        layer with its current vector; ``step(layer, H v, round)`` returns (estimate, converged) and
        updates ``vectors`` in place."""
        eigen = [0.0] * len(self.params)
        iterations = [0] * len(self.params)
        active = set(vectors)
        steps = bar(max_iter, desc)
        for count in range(1, max_iter + 1):
            steps.update(1)
            steps.set_postfix(unconverged=len(active))
            products = self.block_hvp({layer: vectors[layer] for layer in sorted(active)})
            for layer, hv in products.items():
                eigen[layer], done = step(layer, hv, count)
                iterations[layer] = count
                if done:
                    active.discard(layer)
            if not active:
                break
        steps.close()
        return eigen, iterations


class _CapturedHVP:
    """One calibration batch's forward, gradient and HVPs, captured as a CUDA graph.

    ``mode="full"``: outputs (H v)_k for all k. ``mode="block"``: outputs H_kk v_k for all k (each
    layer's gradient differentiated w.r.t. that layer only). Tangents are copied into static buffers
    before each replay; layers without a tangent get zeros.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
                 loss_fn: Callable, mode: str) -> None:
        self.tangents = [torch.zeros_like(p) for p in params]

        def step() -> list[torch.Tensor]:
            with torch.enable_grad():
                loss = loss_fn(model(inputs), targets)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                if mode == "full":
                    return list(torch.autograd.grad(grads, params, grad_outputs=self.tangents))
                return [torch.autograd.grad(g, p, grad_outputs=t, retain_graph=True)[0]
                        for g, p, t in zip(grads, params, self.tangents)]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step()

    def replay(self, vectors: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        for index, tangent in enumerate(self.tangents):
            if index in vectors:
                tangent.copy_(vectors[index])
            else:
                tangent.zero_()
        self.graph.replay()
        return self.outputs


def _dominant_ritz(alphas: list[float], betas: list[float]) -> tuple[float, float]:
    """Ritz value of largest magnitude of the Lanczos tridiagonal matrix (the eigenvalue power iteration
    would converge to) and the last component of its eigenvector (for the residual bound)."""
    values, vectors = _tridiagonal_eigh(alphas, betas)
    index = int(values.abs().argmax())
    return float(values[index]), float(vectors[-1, index])


def _dominant_ritz_vector(alphas: list[float], betas: list[float]) -> torch.Tensor:
    """Coefficients, in the Krylov basis, of the dominant Ritz vector."""
    values, vectors = _tridiagonal_eigh(alphas, betas)
    return vectors[:, int(values.abs().argmax())]


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    size = len(alphas)
    tridiagonal = torch.zeros(size, size, dtype=torch.float64)
    tridiagonal[range(size), range(size)] = torch.tensor(alphas, dtype=torch.float64)
    if size > 1:
        off = torch.tensor(betas[: size - 1], dtype=torch.float64)
        tridiagonal[range(1, size), range(size - 1)] = off
        tridiagonal[range(size - 1), range(1, size)] = off
    return torch.linalg.eigh(tridiagonal)


@dataclass
class HutchinsonResult:
    samples: torch.Tensor  # [probes, layers]: v_l . (H v)_l per probe
    diag: list[torch.Tensor]  # per layer, same shape as the weight

    @property
    def trace(self) -> list[float]:
        return self.samples.mean(0).tolist()

    @property
    def trace_stderr(self) -> list[float]:
        count = self.samples.shape[0]
        if count < 2:
            return [float("nan")] * self.samples.shape[1]
        return (self.samples.std(0) / count**0.5).tolist()


def _rademacher(shape, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU generator so results are identical on every device for the same seed.
    signs = torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int8)
    return (signs.to(like.dtype) * 2 - 1).to(like.device)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()
