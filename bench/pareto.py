"""NSGA-II search cost on the Pythia-70M-shaped model (sram+reram+photonic, 36 layers, 108 variables).

Prints:
1. population evaluation, vectorized (one numpy call for the whole population) vs per solution (the same
   cost model called once per candidate, as an ElementwiseProblem would): time ratio (goal >= 20x);
2. hypervolume after N generations vs a 10x longer run (goal: within 1%), and both wall times.

    python bench/pareto.py [--population 64] [--generations 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hetcomp import targets
from hetcomp.graph import layer_annotations, trace
from hetcomp.partition.mapping_cost import MappingProblem
from hetcomp.partition.nsga import RowCountProblem, run_nsga2
from hetcomp.progress import set_quiet
from hetcomp.zoo import pythia_70m_shaped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--generations", type=int, default=100)
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(2)
    gm = trace(pythia_70m_shaped(), (torch.zeros(1, 128, dtype=torch.long),))
    mapping = MappingProblem.build([a.layer for a in layer_annotations(gm)],
                                   [targets.get(n) for n in ("sram", "reram", "photonic")], samples=18)
    problem = RowCountProblem(mapping)
    rng = np.random.default_rng(0)
    x = rng.integers(0, problem.xu + 1, size=(args.population, problem.n_var)).astype(float)
    counts = problem.counts(x)

    def vectorized():
        return mapping.evaluate(counts)

    def per_solution():
        return [mapping.evaluate(counts[p]) for p in range(len(counts))]

    timings = {}
    for name, fn in (("vectorized", vectorized), ("per-solution", per_solution)):
        fn()
        repeats, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            fn()
            repeats += 1
        timings[name] = (time.perf_counter() - start) / repeats
    same = np.allclose(vectorized().latency_s, [c.latency_s[0] for c in per_solution()])
    print(f"population {args.population}, {problem.n_var} variables, {len(mapping.layers)} layers")
    print(f"evaluate population: vectorized {timings['vectorized'] * 1e3:.3f} ms, per solution "
          f"{timings['per-solution'] * 1e3:.3f} ms -> {timings['per-solution'] / timings['vectorized']:.1f}x "
          f"(same results: {same})")

    runs = {}
    for generations in (args.generations, 10 * args.generations):
        start = time.perf_counter()
        result = run_nsga2(mapping, args.population, generations, seed=0)
        runs[generations] = (result.hypervolume[-1], time.perf_counter() - start, len(result.latency_s))
    (short_gen, (hv_short, t_short, n_short)), (long_gen, (hv_long, t_long, n_long)) = runs.items()
    print(f"hypervolume after {short_gen} generations: {hv_short:.5f} ({t_short:.1f} s, {n_short} front points)")
    print(f"hypervolume after {long_gen} generations: {hv_long:.5f} ({t_long:.1f} s, {n_long} front points)")
    print(f"short run reaches {hv_short / hv_long:.2%} of the long run's hypervolume (goal: within 1%)")


if __name__ == "__main__":
    main()
