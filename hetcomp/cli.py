"""The ``hetcomp`` command line.

    hetcomp targets
    hetcomp compile examples/digits_cnn.py:build --target pcm+digital [--strategy S] [--laft] [--evaluate 20] --out DIR
    hetcomp report DIR
    hetcomp curvature examples/digits_cnn.py:build [--split test] [--repeats 3] --out DIR

Errors print one line (``hetcomp: error: ...``) and exit 2; ``--debug`` shows the traceback.
``--quiet`` silences progress bars.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

from hetcomp.errors import ConfigError, HetcompError


def _load_builder(spec: str):
    """``path/to/file.py:function`` -> the function (the file is imported as a module)."""
    if ":" not in spec:
        raise ConfigError(f"MODEL must be 'path/to/file.py:function', got {spec!r}")
    file_name, function = spec.rsplit(":", 1)
    path = Path(file_name)
    if not path.is_file():
        raise ConfigError(f"model file {file_name!r} not found")
    sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[path.stem] = module  # so inspect/pickle-free helpers can find the module's source
    module_spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise ConfigError(f"{file_name} has no function {function!r}")
    return getattr(module, function)


def _calibration(data: Any) -> Any:
    if isinstance(data, dict):
        for key in ("calibration", "train"):
            if key in data:
                return data[key]
        raise ConfigError("the data dict returned by MODEL needs a 'train' or 'calibration' loader")
    return data


def _cmd_targets(args: argparse.Namespace) -> int:
    from hetcomp import targets

    print(f"{'name':10s} {'analog':6s} {'ops':22s} {'in/w/out bits':14s} {'noise':20s} {'capacity':>12s} "
          f"{'TMAC/s':>7s} {'pJ/MAC':>7s} {'static W':>8s}  description")
    for name in targets.available():
        t = targets.get(name)
        bits = "/".join("fp" if b is None else str(b) for b in
                        (t.precision.input_bits, t.precision.weight_bits, t.precision.output_bits))
        capacity = "unbounded" if t.capacity_weights is None else f"{t.capacity_weights:,}"
        cost = t.cost
        rate = f"{cost.macs_per_second / 1e12:7.2f}" if cost.modeled else f"{'-':>7s}"
        energy = f"{cost.energy_per_mac_pj:7.3f}" if cost.modeled else f"{'-':>7s}"
        print(f"{name:10s} {'yes' if t.analog else 'no':6s} {','.join(sorted(t.supports)):22s} {bits:14s} "
              f"{t.noise.kind:20s} {capacity:>12s} {rate} {energy} {cost.static_power_w:8.3f}  {t.description}")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    import torch

    import hetcomp
    from hetcomp import plots, targets

    targets.parse(args.target)  # fail on a bad target before building the model
    built = _load_builder(args.model)()
    model, data = built if isinstance(built, tuple) else (built, None)
    if args.data:
        data = _load_builder(args.data)()
    calibration = _calibration(data) if data is not None else None
    example = None
    if args.input_shape:
        example = (torch.randn(*[int(d) for d in args.input_shape.split(",")]),)
    finetune = None
    if args.laft:
        validation = data.get("val") if isinstance(data, dict) else None
        finetune = hetcomp.LAFT(epochs=args.laft_epochs, patience=args.laft_patience, val_data=validation,
                                checkpoint_dir=args.laft_checkpoints)
    strategy = args.strategy
    if strategy in (None, "pareto") and isinstance(data, dict) and "val" in data and \
            hetcomp.strategies.resolve(strategy, targets.parse(args.target)).name == "pareto":
        strategy = hetcomp.strategies.pareto(val_data=data["val"])  # row remap measures on held-out data
    compiled = hetcomp.compile(model, target=args.target, example_inputs=example,
                               data=None if args.no_hessian else calibration, strategy=strategy,
                               seed=args.seed, finetune=finetune)
    if example is None and calibration is None:
        raise ConfigError("no data to trace with: return (model, data) from MODEL, or pass --input-shape")
    out = Path(args.out)
    compiled.save(out)
    written = plots.write_all(compiled.manifest, out)
    summary = compiled.manifest.summary
    ratio = ", ".join(f"{t} {r:.1%}" for t, r in summary["mac_ratio"].items())
    print(f"compiled {compiled.manifest.model['class']} for {compiled.manifest.target_set} "
          f"({compiled.manifest.strategy}): MAC ratio {ratio}")
    print(f"wrote {out / 'manifest.json'}, {out / 'weights.pt'}, {out / 'model.onnx'}, "
          + ", ".join(str(p) for p in written))
    pareto = compiled.manifest.extra.get("pareto")
    if pareto:
        chosen = pareto["front"][pareto["chosen"]]
        print(f"Pareto front: {len(pareto['front'])} points; chosen latency {_si(chosen['latency_s'], 's')}, "
              f"energy {_si(chosen['energy_j'], 'J')} per sample")
    remap = compiled.manifest.extra.get("row_remap")
    if remap:
        last, metric = remap["trajectory"][-1], remap["metric"]
        print(f"row remap: {metric} {remap['trajectory'][0][metric]:.4f} -> {last[metric]:.4f} (digital "
              f"{remap[f'baseline_{metric}']:.4f}) in {len(remap['trajectory']) - 1} steps; {remap['stopped']}; "
              f"latency {_si(last['latency_s'], 's')}, energy {_si(last['energy_j'], 'J')} per sample")
    if args.evaluate:
        if not (isinstance(data, dict) and "test" in data):
            raise ConfigError("--evaluate needs a 'test' loader in the data dict returned by MODEL")
        print(f"test: {compiled.evaluate(data['test'], repeats=args.evaluate, t_inference=args.t_inference)}")
    return 0


def _si(value: float, unit: str) -> str:
    """3 significant digits with an SI prefix: 2.74e-9 s -> '2.74 ns'."""
    from hetcomp.plots import si_scale

    factor, label = si_scale([value], unit)
    return f"{value * factor:.3g} {label}"


def _format_metric(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _cmd_report(args: argparse.Namespace) -> int:
    from hetcomp import plots
    from hetcomp.manifest import Manifest

    manifest = Manifest.load(args.directory)
    summary = manifest.summary
    print(f"{manifest.model['class']} on {manifest.target_set}, strategy {manifest.strategy}, seed {manifest.seed}")
    print("MAC ratio: " + ", ".join(f"{t} {r:.1%}" for t, r in summary["mac_ratio"].items()))
    keys = ["hessian_trace", "lambda_max", "hni", "scr"]
    print(f"{'layer':16s} {'kind':14s} {'MACs':>10s} " + " ".join(f"{k:>12s}" for k in keys)
          + f" {'assignment':12s} reason")
    for layer in manifest.layers:
        metrics = " ".join(f"{_format_metric(layer['metrics'].get(k)):>12s}" for k in keys)
        assignment = layer["assignment"] if isinstance(layer["assignment"], str) else str(layer["assignment"])
        print(f"{layer['name']:16s} {layer['kind']:14s} {layer['macs']:>10,} {metrics} {assignment:12s} "
              f"{layer['reason']}")
    directory = Path(args.directory)
    directory = directory if directory.is_dir() else directory.parent
    written = plots.write_all(manifest, directory)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _cmd_curvature(args: argparse.Namespace) -> int:
    from hetcomp.analysis.vulnerability import vulnerability_study

    built = _load_builder(args.model)()
    model, data = built if isinstance(built, tuple) else (built, None)
    if isinstance(data, dict):
        if args.split not in data:
            raise ConfigError(f"the data dict returned by MODEL has no {args.split!r} split; it has {sorted(data)}")
        data = data[args.split]
    if data is None:
        raise ConfigError("curvature needs labelled data: return (model, data) from MODEL")
    study = vulnerability_study(model, data, repeats=args.repeats, h=args.h, n=args.probes, seed=args.seed,
                                t_inference=args.t_inference, out=args.out, title=f"{type(model).__name__}: ")
    print(study.report())
    print("wrote " + ", ".join(str(p) for p in study.plots))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetcomp", description="Compile PyTorch models for heterogeneous "
                                     "analog/digital accelerators.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("targets", help="list the known targets").set_defaults(run=_cmd_targets)

    compile_cmd = commands.add_parser("compile", help="compile a model; write manifest, ONNX and plots")
    compile_cmd.add_argument("model", help="path/to/file.py:function returning a model or (model, data)")
    compile_cmd.add_argument("--target", default="pcm+digital", help="'+'-joined targets (default pcm+digital)")
    compile_cmd.add_argument("--strategy", default=None, help="partition strategy (default: the target set's)")
    compile_cmd.add_argument("--data", default=None, help="path/to/file.py:function returning calibration data")
    compile_cmd.add_argument("--input-shape", default=None, help="example input shape, e.g. 1,1,8,8")
    compile_cmd.add_argument("--no-hessian", action="store_true", help="skip the Hessian metrics")
    compile_cmd.add_argument("--seed", type=int, default=0)
    compile_cmd.add_argument("--laft", action="store_true", help="layer-wise analog fine-tuning after partitioning "
                             "(validation: the data dict's 'val' loader, else a split of the training data)")
    compile_cmd.add_argument("--laft-epochs", type=int, default=10, help="LAFT epochs per stage")
    compile_cmd.add_argument("--laft-patience", type=int, default=3, help="LAFT early-stop patience")
    compile_cmd.add_argument("--laft-checkpoints", default="build/laft",
                             help="folder for LAFT stage checkpoints (a rerun resumes finished stages)")
    compile_cmd.add_argument("--evaluate", type=int, default=0, metavar="REPEATS",
                             help="evaluate on the data dict's 'test' loader over this many hardware repeats")
    compile_cmd.add_argument("--t-inference", type=float, default=86400.0, help="seconds of drift for --evaluate")
    compile_cmd.add_argument("--out", required=True, help="output folder")
    compile_cmd.set_defaults(run=_cmd_compile)

    report = commands.add_parser("report", help="print a manifest's per-layer table and write its plots")
    report.add_argument("directory", help="folder with manifest.json (or the file itself)")
    report.set_defaults(run=_cmd_report)

    curvature = commands.add_parser("curvature", help="input-curvature study: failure rate by curvature decile "
                                    "per analog non-ideality profile, and risk-gated routing")
    curvature.add_argument("model", help="path/to/file.py:function returning (model, data)")
    curvature.add_argument("--split", default="test", help="which split of a data dict to analyse (default test)")
    curvature.add_argument("--repeats", type=int, default=3, help="independent programmings per profile")
    curvature.add_argument("--probes", type=int, default=10, help="Rademacher probes n")
    curvature.add_argument("--h", type=float, default=1e-3, help="finite-difference step h")
    curvature.add_argument("--t-inference", type=float, default=86400.0, help="seconds of drift (PCM profiles)")
    curvature.add_argument("--seed", type=int, default=0)
    curvature.add_argument("--out", required=True, help="output folder for the plots")
    curvature.set_defaults(run=_cmd_curvature)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from hetcomp.progress import set_quiet

    set_quiet(args.quiet)
    try:
        return args.run(args)
    except Exception as err:  # one clear line for any failure; the traceback only with --debug
        if args.debug:
            raise
        text = str(err).splitlines()[0] if str(err) else ""
        message = text if isinstance(err, HetcompError) else f"{type(err).__name__}: {text}"
        print(f"hetcomp: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
