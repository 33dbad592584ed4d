"""Which samples fail on analog hardware: analog-only failure rate by input-curvature decile, per
non-ideality profile (Sharma et al., Table I / Fig. 1).

Profiles toggle three non-idealities independently (2^3 = 8, "ideal" included), each a variant of
the PCM target (targets are data: a profile only changes the target's lowering settings and output
precision, and the aihwkit lowering reads them):

- ADC: 9-bit output quantisation (out_res = 1/(2^9 - 2)) with the target's output range;
- WNoise: static Gaussian weight noise at programming, std 2% of g_max;
- PCM: aihwkit's PCM programming noise, read noise and drift to ``t_inference`` (global drift
  compensation).

Every profile maps *all* weight-static layers to analog, with no output noise and ideal DACs (the
paper's "ideal" analog baseline), and no retraining. An *analog-only failure* is a sample the digital
model classifies correctly and the analog model does not. The failure rate of a decile is the
fraction of its digitally-correct samples that fail analog-only (with that denominator rates are
comparable across deciles whose digital accuracy differs), averaged over independent programming
repeats. Each decile's rate has a 95% bootstrap interval over repeats and the decile's samples
(hetcomp.stats.bootstrap_accuracy on the failure indicators): a decile holds N/10 samples, so at 36 per decile
(the 359 test digits) one failure moves the rate by 3 points.

The repeats are ``hetcomp.evaluate``'s (``RepeatRunner``): repeat-vectorized for every profile whose layers and
graph allow it, one repeat at a time through aihwkit's tiles otherwise (``FailureAnalysis.methods``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hetcomp import checks
from hetcomp.errors import ConfigError
from hetcomp.evaluate import RepeatRunner, batched_logits, staged
from hetcomp.graph import trace
from hetcomp.graph.layers import mappable_nodes
from hetcomp.lower import lower_graph
from hetcomp.targets import Precision, TargetSet, get
from hetcomp.targets.base import Target

NON_IDEALITIES = ("ADC", "WNoise", "PCM")
ADC_BITS = 9
STATIC_WEIGHT_NOISE = 0.02


def profile_name(enabled: tuple[str, ...]) -> str:
    return "+".join(enabled) if enabled else "ideal"


def all_profiles() -> list[tuple[str, ...]]:
    """The 2^3 combinations, ideal first, full profile last."""
    return [combo for size in range(4) for combo in itertools.combinations(NON_IDEALITIES, size)]


def profile_target(enabled: tuple[str, ...], base: Target | None = None) -> Target:
    """The PCM target with only the ``enabled`` non-idealities switched on."""
    base = base or get("pcm")
    unknown = set(enabled) - set(NON_IDEALITIES)
    if unknown:
        raise ConfigError(f"unknown non-ideality {sorted(unknown)}; known: {NON_IDEALITIES}")
    pcm = "PCM" in enabled
    device = {
        **base.device, "out_noise": 0.0,
        "out_bound": base.device.get("out_bound", 12.0) if "ADC" in enabled else 0.0,
        "prog_noise_scale": 1.0 if pcm else 0.0, "read_noise_scale": 1.0 if pcm else 0.0,
        "drift_scale": 1.0 if pcm else 0.0,
        "static_weight_noise": STATIC_WEIGHT_NOISE if "WNoise" in enabled else 0.0,
    }
    precision = Precision(input_bits=None, weight_bits=None, output_bits=ADC_BITS if "ADC" in enabled else None)
    return dataclasses.replace(base, name=f"{base.name}[{profile_name(enabled).replace('+', ',')}]", device=device,
                               precision=precision)


def lower_all_analog(model: nn.Module, example: torch.Tensor, target: Target) -> tuple[nn.Module, dict]:
    """``model`` with every weight-static layer lowered to ``target`` (dynamic ops stay digital)."""
    gm = trace(model, (example,))
    digital = get("digital")
    for _, annotation in mappable_nodes(gm):
        annotation.assignment = target.name if target.supports_kind(annotation.layer.kind) else digital.name
    return lower_graph(gm, TargetSet((digital, target)))


def deciles(values: torch.Tensor, bins: int = 10) -> list[np.ndarray]:
    """Indices of ``values`` sorted ascending and cut into ``bins`` equal-sized bins (sizes differ by at
    most one when N is not a multiple of ``bins``). Ties keep input order (stable sort)."""
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    return np.array_split(order, bins)


def decile_failure_rates(curvature: torch.Tensor, digital_correct: torch.Tensor, analog_correct: torch.Tensor,
                         bins: int = 10, intervals: list | None = None, draws: int = 1000) -> list[float]:
    """Analog-only failure rate per curvature decile (low to high); NaN for a decile with no
    digitally-correct sample. ``analog_correct`` may have a leading repeats dimension (averaged).
    ``intervals``: a list that receives each decile's 95% bootstrap interval (low, high) over repeats and
    the decile's samples ((nan, nan) for an empty decile)."""
    digital_correct = np.asarray(digital_correct, dtype=bool)
    analog_correct = np.atleast_2d(np.asarray(analog_correct, dtype=bool))
    if analog_correct.shape[1] != len(digital_correct) or len(curvature) != len(digital_correct):
        raise ConfigError("curvature, digital and analog results must cover the same samples")
    failures = digital_correct[None, :] & ~analog_correct  # [repeats, N]
    rates = []
    for index, members in enumerate(deciles(curvature, bins)):
        eligible = members[digital_correct[members]]
        rates.append(float(failures[:, eligible].mean()) if len(eligible) else float("nan"))
        if intervals is not None:
            if len(eligible):
                from hetcomp.stats import bootstrap_accuracy

                interval = bootstrap_accuracy(failures[:, eligible], draws=draws, seed=index)
                intervals.append((interval.low, interval.high))
            else:
                intervals.append((float("nan"), float("nan")))
    return rates


@dataclass
class FailureAnalysis:
    profiles: list[str]
    rates: dict[str, list[float]]  # profile -> failure rate per decile
    overall: dict[str, float]  # profile -> analog-only failure rate over all digitally-correct samples
    analog_accuracy: dict[str, float]
    digital_accuracy: float
    repeats: int
    t_inference: float
    # profile -> per decile, the rate's 95% bootstrap interval (low, high) over repeats and samples
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    decile_sizes: list[int] = field(default_factory=list)
    # For routing: the full profile's logits per repeat [R, N, C], the digital logits and the labels.
    full_logits: torch.Tensor | None = field(default=None, repr=False)
    digital_logits: torch.Tensor | None = field(default=None, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)
    # profile -> how its repeats ran (hetcomp.evaluate.RepeatRunner.method: "vectorized" or "tiles (why)")
    methods: dict[str, str] = field(default_factory=dict)
    # profile -> [R, N] bool: whether the analog model classified each sample correctly in each repeat
    analog_correct: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def d10_above_d1(self, name: str) -> bool:
        """Whether D10's failure-rate interval lies entirely above D1's."""
        intervals = self.intervals.get(name)
        return bool(intervals) and intervals[-1][0] > intervals[0][1]

    def table(self) -> str:
        def cell(name: str, decile: int) -> str:
            rate = 100 * self.rates[name][decile]
            if not self.intervals.get(name):
                return f"{rate:6.2f}"
            low, high = (100 * v for v in self.intervals[name][decile])
            return f"{rate:5.2f} [{low:5.2f}, {high:5.2f}]"

        width = 22 if self.intervals else 8
        lines = [f"{'profile':15s} {'D1 FR % [95%]' if self.intervals else 'D1 FR %':>{width}s} "
                 f"{'D10 FR % [95%]' if self.intervals else 'D10 FR %':>{width}s} {'all FR %':>9s} "
                 f"{'analog acc':>11s}" + ("  D10>D1" if self.intervals else "")]
        for name in self.profiles:
            lines.append(f"{name:15s} {cell(name, 0):>{width}s} {cell(name, -1):>{width}s} "
                         f"{100 * self.overall[name]:9.2f} {self.analog_accuracy[name]:11.4f}"
                         + (f"  {'yes' if self.d10_above_d1(name) else 'no':>6s}" if self.intervals else ""))
        sizes = f"{min(self.decile_sizes)}-{max(self.decile_sizes)} samples per decile; " if self.decile_sizes else ""
        lines.append(f"(digital accuracy {self.digital_accuracy:.4f}; {sizes}FR = analog-only failures / "
                     f"digitally-correct samples, mean over {self.repeats} programming repeats, "
                     f"t = {self.t_inference:g} s" + ("; [95%]: bootstrap over repeats and the decile's samples; "
                                                      "D10>D1: the intervals do not overlap)" if self.intervals
                                                      else ")"))
        return "\n".join(lines)


def failure_by_decile(model: nn.Module, data: Any, curvature: torch.Tensor, repeats: int = 3,
                      t_inference: float = 86400.0, seed: int = 0,
                      profiles: list[tuple[str, ...]] | None = None, bins: int = 10,
                      exact_tiles: bool = False) -> FailureAnalysis:
    """Analog-only failure rate per curvature decile for each non-ideality profile.

    Each profile's repeats are ``hetcomp.evaluate``'s (``RepeatRunner``: repeat r seeded by (seed, r)): vectorized
    where its layers and graph allow it, else (or with ``exact_tiles``) one repeat at a time through aihwkit's
    tiles; ``FailureAnalysis.methods`` says which ran for each profile."""
    repeats = checks.integer("repeats", repeats)
    t_inference = checks.real("t_inference (seconds)", t_inference, 0.0)
    seed = checks.seed(seed)
    exact_tiles = checks.boolean("exact_tiles", exact_tiles)
    device = next(model.parameters()).device
    inputs, labels = staged(data, device)
    if len(curvature) != len(labels):
        raise ConfigError(f"curvature has {len(curvature)} values for {len(labels)} samples: compute it on the "
                          "same data, in the same order (shuffle=False)")
    model.eval()
    with torch.no_grad():
        digital_logits = batched_logits(model, inputs)
    digital_correct = (digital_logits.argmax(-1) == labels).cpu()
    profiles = profiles if profiles is not None else all_profiles()
    analysis = FailureAnalysis([profile_name(p) for p in profiles], {}, {}, {}, float(digital_correct.float().mean()),
                               repeats, t_inference, digital_logits=digital_logits.cpu(), labels=labels.cpu(),
                               decile_sizes=[len(m) for m in deciles(curvature, bins)])
    for enabled in profiles:
        name = profile_name(enabled)
        lowered, report = lower_all_analog(model, inputs[:2], profile_target(enabled))
        runner = RepeatRunner.on_inputs(lowered, report, inputs, repeats, t_inference, seed, exact_tiles=exact_tiles)
        stacked = runner.stacked()  # [R, N, C] logits
        analysis.methods[name] = runner.method
        analog_correct = stacked.argmax(-1) == labels.cpu()[None]
        analysis.analog_correct[name] = analog_correct
        analysis.intervals[name] = []
        analysis.rates[name] = decile_failure_rates(curvature, digital_correct, analog_correct, bins,
                                                    intervals=analysis.intervals[name])
        failures = digital_correct[None] & ~analog_correct
        analysis.overall[name] = float(failures[:, digital_correct].float().mean()) if digital_correct.any() else 0.0
        analysis.analog_accuracy[name] = float(analog_correct.float().mean())
        if len(enabled) == len(NON_IDEALITIES):
            analysis.full_logits = stacked
    return analysis
