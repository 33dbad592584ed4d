"""The ``hetcomp`` command line (also ``python -m hetcomp``).

    hetcomp targets
    hetcomp compile examples/digits_cnn.py:build --target pcm+digital [--strategy S] [--laft] [--evaluate 20] --out DIR
    hetcomp report DIR
    hetcomp evaluate DIR examples/digits_cnn.py:build [--repeats 20] [--split test]
    hetcomp curvature examples/digits_cnn.py:build [--split test] [--repeats 3] --out DIR

Every error a user causes (bad arguments, a model file that fails, a malformed manifest) prints one line
(``hetcomp: error: ...``) on stderr and exits 2; ``--debug`` also prints the traceback. ``--quiet`` silences
progress bars.

MODEL files are imported with their folder appended to the END of ``sys.path`` while the file is loaded and
its function runs: the file can import its neighbours (``from helpers import x``), but a neighbour never
shadows an installed package (an ``onnx.py`` next to the model is not the ``onnx`` that export imports), and
the folder is taken off ``sys.path`` again before compiling. The modules the file imported stay in
``sys.modules`` (the model's classes and loaders still need them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hetcomp.errors import ConfigError, HetcompError, ManifestError


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (no usage block), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"hetcomp: error: {message} (see '{self.prog} --help')\n")


def _shape(text: str) -> tuple[int, ...]:
    """``--input-shape`` "1,1,8,8" -> (1, 1, 8, 8); anything else is a clear argparse error."""
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"malformed shape {text!r}: expected comma-separated positive integers, "
                                         "e.g. 1,1,8,8")
    return dims


@contextlib.contextmanager
def _neighbours_importable(folder: str) -> Iterator[None]:
    """``folder`` at the END of sys.path for the duration (installed packages win), then taken off again."""
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            del sys.path[len(sys.path) - 1 - sys.path[::-1].index(folder)]  # ours: the last occurrence


def _module_name(path: Path) -> str:
    """The file's stem, unless that would replace (or shadow) another module: then a private name."""
    stem = path.stem
    existing = sys.modules.get(stem)
    if existing is not None:
        origin = getattr(existing, "__file__", None)
        return stem if origin and Path(origin).resolve() == path.resolve() else f"_hetcomp_model_{stem}"
    try:
        found = importlib.util.find_spec(stem) if stem.isidentifier() else None
    except (ImportError, ValueError):
        found = None
    if found is not None and (found.origin is None or Path(found.origin).resolve() != path.resolve()):
        return f"_hetcomp_model_{stem}"
    return stem if stem.isidentifier() else "_hetcomp_model_" + "".join(c if c.isalnum() else "_" for c in stem)


def _raised(err: BaseException) -> str:
    """'SystemExit(0)' / 'ValueError: first line of the message'."""
    if isinstance(err, SystemExit):
        return f"SystemExit({err.code!r})"
    text = str(err).splitlines()[0] if str(err) else ""
    return type(err).__name__ + (f": {text}" if text else "")


def _run_builder(spec: str, returns: str = "a model or (model, data)") -> Any:
    """``path/to/file.py:function`` -> what ``function()`` returns (the file is imported as a module).

    Anything the user's code raises, SystemExit included (KeyboardInterrupt excepted), becomes one
    ConfigError naming the file; the original stays chained for ``--debug``.
    """
    if ":" not in spec:
        raise ConfigError(f"MODEL must be 'path/to/file.py:function', got {spec!r}")
    file_name, function = spec.rsplit(":", 1)
    path = Path(file_name)
    if not path.is_file():
        raise ConfigError(f"model file {file_name!r} not found")
    name = _module_name(path)
    with _neighbours_importable(str(path.resolve().parent)):
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"{file_name} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        previous = sys.modules.get(name)
        sys.modules[name] = module  # so inspect/pickle-free helpers can find the module's source
        try:
            module_spec.loader.exec_module(module)
        except KeyboardInterrupt:
            raise
        except BaseException as err:
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
            raise ConfigError(f"importing {file_name} raised {_raised(err)}") from err
        builder = getattr(module, function, None)
        if builder is None:
            raise ConfigError(f"{file_name} has no function {function!r}")
        if not callable(builder):
            raise ConfigError(f"{file_name}: {function!r} is not a function")
        try:
            return builder()
        except KeyboardInterrupt:
            raise
        except BaseException as err:
            hint = f" instead of returning {returns}" if isinstance(err, SystemExit) else ""
            raise ConfigError(f"{spec} raised {_raised(err)}{hint}") from err


def _calibration(data: Any, training: bool = False) -> Any:
    """The loader compile gets: a data dict's 'calibration' loader (the Hessian passes take its first batches),
    or its 'train' loader. With ``training`` (LAFT) the 'train' loader comes first: compile's data is also what
    fine-tuning trains on, and a small calibration subset must not silently become the training set."""
    if isinstance(data, dict):
        for key in (("train", "calibration") if training else ("calibration", "train")):
            if key in data:
                return data[key]
        raise ConfigError("the data dict returned by MODEL needs a 'train' or 'calibration' loader")
    return data


def _first_batch_inputs(data: Any) -> tuple:
    """Example inputs from the calibration data's first batch, as hetcomp.compile would take them."""
    from hetcomp.data import first_inputs
    from hetcomp.errors import DataError

    try:
        return first_inputs(data, what="the calibration data")
    except DataError as err:
        raise ConfigError(f"{err}; or pass --input-shape") from None


def _cmd_targets(args: argparse.Namespace) -> int:
    from hetcomp import targets

    print(f"{'name':10s} {'analog':6s} {'ops':22s} {'in/w/out bits':14s} {'simulator':20s} {'capacity':>12s} "
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
              f"{t.simulator or 'exact':20s} {capacity:>12s} {rate} {energy} {cost.static_power_w:8.3f}  "
              f"{t.description}")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    import torch

    import hetcomp
    from hetcomp import targets

    # Everything that can be checked is checked before the model is built or compile runs.
    for path in args.target_file:  # TOML target files first, so --target can name them
        targets.load_file(path, overwrite=True)
    target_set = targets.parse(args.target)  # fail on a bad target before building the model
    chosen = hetcomp.strategies.resolve(args.strategy, target_set)  # unknown strategy: fail now too
    if args.no_hessian and args.laft:
        raise ConfigError("--laft needs the data and its Hessian analysis; it cannot be combined with --no-hessian")
    if args.no_hessian and chosen.needs_data:
        raise ConfigError(f"strategy {chosen.name!r} needs data, which compile analyses for the Hessian that "
                          "--no-hessian skips; drop --no-hessian or pick a strategy without data (e.g. --strategy "
                          "first-last-digital, all-digital, or pareto-po for several analog tiers)")
    built = _run_builder(args.model)
    model, data = built if isinstance(built, tuple) else (built, None)
    if args.data:
        data = _run_builder(args.data, returns="calibration data")
    calibration = _calibration(data, training=args.laft) if data is not None else None
    if chosen.needs_data and calibration is None:
        raise ConfigError(f"strategy {chosen.name!r} needs data: return (model, data) from MODEL or pass --data; "
                          "without data use e.g. --strategy first-last-digital (one analog tier) or pareto-po "
                          "(several)")
    if args.laft and calibration is None:
        raise ConfigError("--laft needs training data: return (model, data) from MODEL or pass --data")
    if args.evaluate and not (isinstance(data, dict) and "test" in data):
        raise ConfigError("--evaluate needs a 'test' loader in the data dict returned by MODEL")
    example = None
    if args.input_shape:
        example = (torch.randn(*args.input_shape),)
    elif calibration is None:
        raise ConfigError("no data to trace with: return (model, data) from MODEL, or pass --input-shape")
    elif args.no_hessian:  # compile gets no data (that would run the Hessian): trace with its first batch
        example = _first_batch_inputs(calibration)
    finetune = None
    if args.laft:
        validation = data.get("val") if isinstance(data, dict) else None
        finetune = hetcomp.LAFT(epochs=args.laft_epochs, patience=args.laft_patience, val_data=validation,
                                checkpoint_dir=args.laft_checkpoints)
    strategy = args.strategy
    if chosen.name == "pareto" and strategy in (None, "pareto") and isinstance(data, dict) and "val" in data:
        strategy = hetcomp.strategies.pareto(val_data=data["val"])  # row remap measures on held-out data
    compiled = hetcomp.compile(model, target=args.target, example_inputs=example,
                               data=None if args.no_hessian else calibration, strategy=strategy,
                               seed=args.seed, finetune=finetune)
    traced_by_export = compiled.graph.meta["hetcomp"]["frontend"] == "export"
    if traced_by_export:
        print("note: the model was traced by the torch.export front end, whose ONNX export is not built yet: "
              "writing the manifest, weights and plots without model.onnx")
    out = compiled.save(Path(args.out), onnx=not traced_by_export, plots=True)
    summary = compiled.manifest.summary
    ratio = ", ".join(f"{t} {r:.1%}" for t, r in summary["mac_ratio"].items())
    print(f"compiled {compiled.manifest.model['class']} for {compiled.manifest.target_set} "
          f"({compiled.manifest.strategy}): MAC ratio {ratio}")
    print(_cost_line(summary))
    files = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    print("wrote " + ", ".join(str(p) for p in files))  # whatever save wrote (its format is its own)
    pareto = compiled.manifest.extra.get("pareto")
    if pareto:
        point = pareto["front"][pareto["chosen"]]
        print(f"Pareto front: {len(pareto['front'])} points; chosen latency {_si(point['latency_s'], 's')}, "
              f"energy {_si(point['energy_j'], 'J')} per sample")
    remap = compiled.manifest.extra.get("row_remap")
    if remap:
        last, metric = remap["trajectory"][-1], remap["metric"]
        print(f"row remap: {metric} {remap['trajectory'][0][metric]:.4f} -> {last[metric]:.4f} (digital "
              f"{remap[f'baseline_{metric}']:.4f}) in {len(remap['trajectory']) - 1} steps; {remap['stopped']}; "
              f"latency {_si(last['latency_s'], 's')}, energy {_si(last['energy_j'], 'J')} per sample")
    if args.evaluate:
        print(f"test: {compiled.evaluate(data['test'], repeats=args.evaluate, t_inference=args.t_inference)}")
    return 0


def _cost_line(summary: dict[str, Any]) -> str:
    """The mapping's estimated cost per sample, total and per target, with SI units."""
    cost = summary.get("cost") or {}
    if not cost.get("modeled"):
        return f"estimated cost: not modeled ({cost.get('reason', 'no cost summary')})"
    parts = ", ".join(f"{name} {_si(entry['busy_s'], 's')} / {_si(entry['energy_j'], 'J')}"
                      for name, entry in cost["per_target"].items() if entry["macs"] > 0)
    return (f"estimated per sample: latency {_si(cost['latency_s'], 's')}, energy {_si(cost['energy_j'], 'J')} "
            f"(busy time / energy: {parts})")


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


def _report_lines(manifest: Any) -> list[str]:
    summary = manifest.summary
    lines = [f"{manifest.model['class']} on {manifest.target_set}, strategy {manifest.strategy}, "
             f"seed {manifest.seed}",
             "MAC ratio: " + ", ".join(f"{t} {r:.1%}" for t, r in summary["mac_ratio"].items()),
             _cost_line(summary)]
    keys = ["hessian_trace", "lambda_max", "hni", "scr"]
    lines.append(f"{'layer':16s} {'kind':14s} {'MACs':>10s} " + " ".join(f"{k:>12s}" for k in keys)
                 + f" {'assignment':12s} reason")
    for layer in manifest.layers:
        metrics = " ".join(f"{_format_metric(layer['metrics'].get(k)):>12s}" for k in keys)
        assignment = layer["assignment"] if isinstance(layer["assignment"], str) else str(layer["assignment"])
        lines.append(f"{layer['name']:16s} {layer['kind']:14s} {layer['macs']:>10,} {metrics} {assignment:12s} "
                     f"{layer['reason']}")
    return lines


def _cmd_report(args: argparse.Namespace) -> int:
    from hetcomp import plots
    from hetcomp.rebuild import read_manifest
    from hetcomp.storage.files import add_outputs

    manifest = read_manifest(args.directory)  # schema, targets and assignments checked; summary recomputed
    try:
        lines = _report_lines(manifest)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:  # fields of the wrong shape
        raise ManifestError(f"manifest in {args.directory} is malformed ({_raised(err)}); was it written by "
                            "hetcomp?") from err
    print("\n".join(lines))
    directory = Path(args.directory)
    directory = directory if directory.is_dir() else directory.parent
    written = plots.write_all(manifest, directory)
    add_outputs(directory, [Path(p).name for p in written])  # still hetcomp's output: a later save may replace it
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import hetcomp

    directory = Path(args.directory)
    hetcomp.Manifest.load(directory)  # a malformed folder fails before the model is built
    built = _run_builder(args.model, returns="(model, data)")
    model, data = built if isinstance(built, tuple) else (built, None)
    if not isinstance(data, dict) or args.split not in data:
        raise ConfigError(f"evaluate needs a data dict with a {args.split!r} loader returned by MODEL")
    loaded = hetcomp.load(directory, model, _first_batch_inputs(data[args.split]))
    result = loaded.evaluate(data[args.split], repeats=args.repeats, t_inference=args.t_inference, seed=args.seed)
    print(f"{args.split}: {result}")
    return 0


def _cmd_curvature(args: argparse.Namespace) -> int:
    from hetcomp.curvature.study import vulnerability_study

    built = _run_builder(args.model, returns="(model, data)")
    model, data = built if isinstance(built, tuple) else (built, None)
    if isinstance(data, dict):
        known = [name for name in ("train", "val", "test") if name in data] + sorted(set(data) - {"train", "val",
                                                                                                "test"})
        names = known if args.split == "all" else args.split.split(",")
        missing = [name for name in names if name not in data]
        if missing:
            raise ConfigError(f"the data dict returned by MODEL has no {missing[0]!r} split; it has {sorted(data)}")
        if len(names) == 1:
            data = data[names[0]]
        else:  # several splits: one tensor pair, in the order named (curvature and failures need the same order)
            import torch

            from hetcomp.evaluate import staged

            pairs = [staged(data[name], torch.device("cpu"), what=f"split {name!r}") for name in names]
            data = (torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))
    if data is None:
        raise ConfigError("curvature needs labelled data: return (model, data) from MODEL")
    study = vulnerability_study(model, data, repeats=args.repeats, h=args.h, n=args.probes, seed=args.seed,
                                t_inference=args.t_inference, out=args.out, title=f"{type(model).__name__}: ")
    print(study.report())
    print("wrote " + ", ".join(str(p) for p in study.plots))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hetcomp", description="Compile PyTorch models for heterogeneous analog/digital "
                     "accelerators. Errors print one line 'hetcomp: error: ...' and exit 2.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="also print the traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("targets", help="list the known targets").set_defaults(run=_cmd_targets)

    compile_cmd = commands.add_parser("compile", help="compile a model; write manifest, ONNX and plots")
    compile_cmd.add_argument("model", help="path/to/file.py:function returning a model or (model, data)")
    compile_cmd.add_argument("--target", default="pcm+digital", help="'+'-joined targets (default pcm+digital)")
    compile_cmd.add_argument("--target-file", action="append", default=[], metavar="TOML",
                             help="register the target a TOML file describes (repeatable), so --target can name it")
    compile_cmd.add_argument("--strategy", default=None, help="partition strategy (default: the target set's)")
    compile_cmd.add_argument("--data", default=None, help="path/to/file.py:function returning calibration data")
    compile_cmd.add_argument("--input-shape", default=None, type=_shape,
                             help="example input shape, e.g. 1,1,8,8 (default: the data's first batch)")
    compile_cmd.add_argument("--no-hessian", action="store_true",
                             help="skip the Hessian analysis (the data still traces the model and feeds --evaluate; "
                             "not with --laft or strategies that need the Hessian)")
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

    evaluate_cmd = commands.add_parser("evaluate", help="load a saved compile and evaluate it over hardware repeats")
    evaluate_cmd.add_argument("directory", help="folder that compile --out (or compiled.save) wrote")
    evaluate_cmd.add_argument("model", help="path/to/file.py:function returning (model, data dict)")
    evaluate_cmd.add_argument("--split", default="test", help="which loader of the data dict (default test)")
    evaluate_cmd.add_argument("--repeats", type=int, default=20, help="independent hardware repeats")
    evaluate_cmd.add_argument("--t-inference", type=float, default=86400.0, help="seconds of drift")
    evaluate_cmd.add_argument("--seed", type=int, default=None, help="repeat seed (default: the compile's)")
    evaluate_cmd.set_defaults(run=_cmd_evaluate)

    curvature = commands.add_parser("curvature", help="input-curvature study: failure rate by curvature decile "
                                    "per analog non-ideality profile, and risk-gated routing")
    curvature.add_argument("model", help="path/to/file.py:function returning (model, data)")
    curvature.add_argument("--split", default="test", help="which split of a data dict to analyse: a name, "
                           "several joined by commas, or 'all' (train, val, test; default test)")
    curvature.add_argument("--repeats", type=int, default=3, help="independent programmings per profile")
    curvature.add_argument("--probes", type=int, default=10, help="Rademacher probes n")
    curvature.add_argument("--h", type=float, default=1e-3, help="finite-difference step h")
    curvature.add_argument("--t-inference", type=float, default=86400.0, help="seconds of drift (PCM profiles)")
    curvature.add_argument("--seed", type=int, default=0)
    curvature.add_argument("--out", required=True, help="output folder for the plots")
    curvature.set_defaults(run=_cmd_curvature)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0, or 2 for any error a user causes)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a one-line argument error (2), already printed
        return stop.code if isinstance(stop.code, int) else 2
    from hetcomp import distributed
    from hetcomp.progress import set_quiet

    set_quiet(args.quiet)
    started, finished = False, False
    try:
        # Under torchrun every rank runs this command; hetcomp shards the work and rank 0 alone prints.
        started = distributed.init()
        if started and not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
        code = args.run(args)
        finished = True
        return code
    except (Exception, SystemExit) as err:  # one clear line for any failure (KeyboardInterrupt propagates)
        if args.debug:
            traceback.print_exc()
        text = str(err).splitlines()[0] if str(err) else ""
        message = text if isinstance(err, HetcompError) and text else _raised(err)
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"hetcomp: error: {message}{hint}", file=sys.stderr)
        return 2
    finally:
        if started:  # the group this command started ends with it, every rank done before any closes
            distributed.shutdown(finished)


if __name__ == "__main__":
    sys.exit(main())
