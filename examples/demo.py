"""The main job (``make demo``): the digits CNN on pcm+digital with every partition strategy.

Trains the CNN once (weights cached under build/weights), then for each strategy: compiles it
(Hessian metrics on calibration data from the training split), optionally runs LAFT (validation on
the validation split), and evaluates 1-day accuracy on the held-out test split over independent
hardware repeats (re-programmed and drifted each repeat). Prints a table of accuracy (mean ± std)
and analog MAC ratio per strategy, and writes manifests, ONNX models and plots under build/demo/.
Then the input-curvature study: analog-only failure rate by curvature decile for the 8 non-ideality
profiles, and risk-gated routing to digital (build/demo/curvature/). Last, the multi-tier run
(examples/multitier.py): a digits transformer on sram+reram+photonic, every strategy with latency,
energy, accuracy and LEP (Table V style), Pareto front and row-remap plots (build/demo/multitier/).

LAFT checkpoints go to build/laft/, so a second ``make demo`` resumes finished stages instead of
re-training. ``--repeats`` and ``--epochs`` trade time for precision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hetcomp  # noqa: E402
from hetcomp import plots  # noqa: E402
from hetcomp.datasets import accuracy  # noqa: E402
from hetcomp.finetune import LAFT  # noqa: E402

# (strategy, run LAFT after it); LAFT does not apply to all-digital (nothing analog) or mac-greedy
# (it retrains inside its own search).
RUNS = [("all-digital", False), ("all-analog", False), ("all-analog", True), ("first-last-digital", False),
        ("first-last-digital", True), ("hni-only", True), ("scr-only", True), ("hilal", False), ("hilal", True),
        ("mac-greedy", False)]
OUT = Path("build/demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="hardware repeats per evaluation")
    parser.add_argument("--epochs", type=int, default=10, help="LAFT epochs per stage (E)")
    parser.add_argument("--t-inference", type=float, default=86400.0, help="seconds after programming")
    args = parser.parse_args()

    from digits_cnn import build

    start = time.perf_counter()
    model, data = build()
    print(f"digits CNN: test accuracy {accuracy(model, data['test']):.4f} (FP32, digital); "
          f"{len(data['train'].dataset)} train / {len(data['val'].dataset)} val / {len(data['test'].dataset)} test")
    example = next(iter(data["test"]))[0]
    finetune = LAFT(epochs=args.epochs, patience=3, val_data=data["val"])
    rows = []
    for strategy, laft in RUNS:
        label = strategy + (" + LAFT" if laft else "")
        began = time.perf_counter()
        compiled = hetcomp.compile(model, target="pcm+digital", example_inputs=(example,), data=data["train"],
                                   strategy=strategy, seed=0, finetune=finetune if laft or strategy == "mac-greedy"
                                   else None)
        compile_seconds = time.perf_counter() - began
        result = compiled.evaluate(data["test"], repeats=args.repeats, t_inference=args.t_inference)
        compiled.save(OUT / label.replace(" + ", "+"), plots=True)
        on_pcm = [layer["name"] for layer in compiled.manifest.layers if layer["assignment"] == "pcm"]
        rows.append({"label": label, "mac_ratio": result.mac_ratio, "mean": result.mean, "std": result.std,
                     "pcm": on_pcm, "compile_s": compile_seconds, "eval_s": result.seconds})
        print(f"  {label:26s} {result}  (compile {compile_seconds:.1f} s, evaluate {result.seconds:.1f} s)",
              flush=True)

    days = args.t_inference / 86400
    print(f"\n{'strategy':26s} {'analog MAC ratio':>16s} {'accuracy at ' + f'{days:g} day':>22s}  layers on pcm")
    for row in rows:
        accuracy_text = f"{row['mean']:.4f} ± {row['std']:.4f}"
        print(f"{row['label']:26s} {row['mac_ratio']:16.3f} {accuracy_text:>22s}  {', '.join(row['pcm']) or '-'}")
    print(f"(mean ± std over {args.repeats} independent repeats: re-programmed, then drifted {args.t_inference:g} s)")

    hilal = hetcomp.Manifest.load(OUT / "hilal")
    print("\nper-layer Hessian metrics and the hilal partition:")
    print(f"{'layer':8s} {'MACs':>8s} {'Tr(H)':>10s} {'lambda_max':>11s} {'HNI':>10s} {'SCR':>7s} "
          f"{'cluster':>10s}  target")
    for layer in hilal.layers:
        m = layer["metrics"]
        print(f"{layer['name']:8s} {layer['macs']:8d} {m['hessian_trace']:10.4f} {m['lambda_max']:11.4f} "
              f"{m['hni']:10.3e} {m['scr']:7.3f} {m['cluster']:>10s}  {layer['assignment']}")
    print(f"reason (conv1): {hilal.layer('conv1')['reason']}")
    summary = plots.strategy_comparison(rows, OUT / "strategies.png",
                                        f"digits CNN on pcm+digital: accuracy {days:g} day after programming")
    print(f"\nplots: {summary}, {OUT}/hilal/hni_scr.png, {OUT}/<strategy>/assignment.png")

    from hetcomp.curvature.study import vulnerability_study
    from hetcomp.evaluate import staged

    # All 1,797 digits (train + val + test, about 180 per curvature decile): the test split alone gives 36 per
    # decile, where one failure moves a decile's rate by 3 points.
    pairs = [staged(data[split], next(model.parameters()).device) for split in ("train", "val", "test")]
    everything = (torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))
    print(f"\ninput-curvature study on all {len(everything[1])} digits (train + val + test; all layers analog, "
          "no fine-tuning):")
    study = vulnerability_study(model, everything, repeats=5, seed=0, t_inference=args.t_inference,
                                out=OUT / "curvature", title="digits CNN, all digits: ")
    print(study.report())
    print("plots: " + ", ".join(str(p) for p in study.plots))

    import multitier

    print("\nmulti-tier mapping (H3PIMAP) of the digits transformer:")
    multitier.main(repeats=args.repeats // 2 or 1)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
