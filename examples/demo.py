"""The main job (``make demo``): digits CNN -> hetcomp.compile for pcm+digital with each strategy.

Trains the CNN once (weights cached under build/weights), computes the Hessian metrics, compiles it
with every strategy available for pcm+digital, prints a table and writes the manifests, ONNX
models and plots under build/demo/<strategy>/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hetcomp  # noqa: E402
from hetcomp import plots  # noqa: E402
from hetcomp.datasets import accuracy  # noqa: E402

STRATEGIES = ["all-digital", "all-analog", "first-last-digital"]
OUT = Path("build/demo")


def main() -> None:
    from digits_cnn import build

    start = time.perf_counter()
    model, data = build()
    print(f"digits CNN: test accuracy {accuracy(model, data['test']):.4f} (FP32, digital)")
    example = next(iter(data["test"]))[0]
    rows = []
    for strategy in STRATEGIES:
        compiled = hetcomp.compile(model, target="pcm+digital", example_inputs=(example,), data=data["train"],
                                   strategy=strategy, seed=0)
        directory = compiled.save(OUT / strategy)
        plots.write_all(compiled.manifest, directory)
        summary = compiled.manifest.summary
        rows.append((strategy, summary["mac_ratio"]["pcm"], summary["layers"]["pcm"], summary["layers"]["digital"],
                     directory))

    print()
    print(f"{'strategy':20s} {'analog MAC ratio':>16s} {'layers on pcm':>14s} {'layers digital':>15s}  manifest")
    for strategy, ratio, on_pcm, on_digital, directory in rows:
        print(f"{strategy:20s} {ratio:16.3f} {on_pcm:14d} {on_digital:15d}  {directory}/manifest.json")

    print("\nper-layer Hessian metrics (first-last-digital manifest):")
    manifest = hetcomp.Manifest.load(OUT / "first-last-digital")
    print(f"{'layer':8s} {'kind':14s} {'MACs':>8s} {'Tr(H)':>10s} {'lambda_max':>11s} {'HNI':>10s} {'SCR':>7s}  target")
    for layer in manifest.layers:
        m = layer["metrics"]
        print(f"{layer['name']:8s} {layer['kind']:14s} {layer['macs']:8d} {m['hessian_trace']:10.4f} "
              f"{m['lambda_max']:11.4f} {m['hni']:10.3e} {m['scr']:7.3f}  {layer['assignment']}")
    print(f"\nplots: {OUT}/<strategy>/assignment.png, hni_scr.png")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
