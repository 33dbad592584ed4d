"""HILAL's aihwkit configuration against each setting hetcomp changes or used to change: 1-day accuracy.

hetcomp's PCM defaults (hetcomp/lower/aihwkit_sim.py DEFAULTS) are HILAL's ``gen_rpu_config`` setting by setting
(tests/test_hilal_config.py compares every field), except the tile class: hetcomp runs aihwkit's torch tile
(``TorchInferenceRPUConfig``), HILAL the C++ ``InferenceRPUConfig`` tile. This bench measures, on the digits CNN
(examples/digits_cnn.py), the 1-day test accuracy of

- ``hilal``: HILAL's configuration (hetcomp's defaults);
- ``cpp tile``: the same with the C++ tile (HILAL's exactly; evaluated one repeat at a time);
- one variant per former hetcomp setting: layer-wise weight scaling, no learned output scales, 256-row tiles;
- ``former``: hetcomp's former defaults (all three at once);

for the ``hilal`` and ``all-analog`` partitions without fine-tuning, and with LAFT (``--laft-epochs``; learned
output scales are trained only there, so without fine-tuning they are 1 and cannot matter). Each cell: mean over
``--repeats`` programmed-and-drifted repeats with a 95% bootstrap interval over repeats *and* test images
(hetcomp.stats), and the difference from HILAL's configuration, paired over test images.

    python bench/hilal_config.py [--repeats 40] [--laft-epochs 10] [--out bench/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import write_results  # noqa: E402

import hetcomp  # noqa: E402
from hetcomp.finetune import LAFT  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402
from hetcomp.stats import bootstrap_accuracy, bootstrap_difference, correctness  # noqa: E402
from hetcomp.targets import registry  # noqa: E402

VARIANTS = {
    "hilal": {},
    "cpp tile": {"tile": "cpp"},
    "layer-wise weight scaling": {"weight_scaling_columnwise": False},
    "no learned out scales": {"learn_out_scaling": False, "out_scaling_columnwise": False},
    "max_output_size 256": {"max_output_size": 256},
    "former hetcomp": {"weight_scaling_columnwise": False, "learn_out_scaling": False,
                       "out_scaling_columnwise": False, "max_output_size": 256},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--laft-epochs", type=int, default=10, help="0: no LAFT rows")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    set_quiet(True)
    from digits_cnn import build

    model, data = build()
    x = next(iter(data["test"]))[0]
    pcm = registry.get("pcm")
    runs = [("hilal", None), ("all-analog", None)]
    if args.laft_epochs:
        runs += [("hilal", "LAFT"), ("all-analog", "LAFT")]
    matrices: dict[tuple[str, str], object] = {}
    lines = [f"digits CNN (examples/digits_cnn.py), test split ({len(data['test'].dataset)} images), "
             f"{args.repeats} repeats at t = 1 day; 95% bootstrap intervals over repeats and test images; "
             f"LAFT: epochs {args.laft_epochs}, patience 3, validation split", ""]
    header = f"{'configuration':27s} {'partition':19s} {'1-day accuracy % [95%]':>24s} {'vs HILAL, points [95%]':>26s}"
    lines += [header]
    print(header, flush=True)
    for variant in args.variants:
        target = dataclasses.replace(pcm, name=f"pcm-{variant.replace(' ', '-')}", device={**pcm.device,
                                                                                           **VARIANTS[variant]})
        registry.register(target, overwrite=True)
        for strategy, finetune in runs:
            start = time.perf_counter()
            laft = (LAFT(epochs=args.laft_epochs, patience=3, val_data=data["val"], checkpoint_dir=None)
                    if finetune else None)
            compiled = hetcomp.compile(model, f"{target.name}+digital", (x,), data=data["train"], strategy=strategy,
                                       finetune=laft, seed=0)
            matrix = correctness(compiled.module, compiled.lowering, data["test"], repeats=args.repeats, seed=0)
            key = f"{strategy}{' + ' + finetune if finetune else ''}"
            matrices[(variant, key)] = matrix
            line = f"{variant:27s} {key:19s} {bootstrap_accuracy(matrix).format(100, 2):>24s}"
            if variant != "hilal" and ("hilal", key) in matrices:
                diff = bootstrap_difference(matrix, matrices[("hilal", key)])
                line += f" {diff.format(100, 2):>24s}{' *' if diff.excludes_zero else '  '}"
            lines.append(line)
            print(f"{line}   ({time.perf_counter() - start:.1f} s)", flush=True)
    lines += ["", "vs HILAL: accuracy minus that of HILAL's configuration (same partition), paired over test images "
              "and repeats (repeat r seeded alike); * = the interval excludes 0"]
    write_results(args.out, "hilal_config.txt", lines)


if __name__ == "__main__":
    main()
