"""Per-tier accuracy after post-training quantization (PTQ) and after LSQ fine-tuning, as in H3PIMAP Table IV.

Every weight layer of a trained model goes on one tier (``all-analog`` on ``<tier>+digital``; on SRAM/ReRAM the
attention products of the transformer stay digital, they cannot run there), and the test accuracy is measured:

- ``PTQ``: the model as trained, quantized per tensor by max-abs at lowering (hetcomp's default);
- ``LSQ``: after LSQ quantization-aware fine-tuning of the whole lowered model (H3PIMAP's recipe: all layers at
  once; learned step sizes, straight-through estimator; hetcomp.lower.tier_sim), ``--epochs`` epochs of SGD
  (momentum 0.9, cosine learning rate), the epoch kept that scores best on the validation split. The weights are
  carried back to the digital graph (``digital_state_dict``) and compiled again, as a user gets them: weight
  steps come back through the clipped weights, input steps are not kept (eval quantizes inputs per call by
  max-abs);
- ``LSQ+in``: the same fine-tuned lowered module evaluated with its learned input steps
  (``tier_sim.learned_input_steps()``): what persisting input steps would add;
- ``LAFT``: hetcomp's own pipeline, ``hetcomp.compile(..., finetune=LAFT(...))`` (layer by layer by HNI,
  HILAL Algorithm 1, the same LSQ underneath), ``--laft-epochs`` epochs per stage (``--no-laft`` skips it).

Rows: SRAM and ReRAM (8-bit, Table I), photonic at 8-8-8 and at 6-6-8 (the registered tier) fine-tuned both
from the float model and, as H3PIMAP does, from the 8-8-8 LSQ model, and photonic at 4 and 3 bits (where
quantization costs enough accuracy to see what LSQ recovers). Accuracy is mean +- std over ``--repeats``
noisy evaluations of the test split (ReRAM's and photonic's read noise); the test split has 359 images, so one
image is 0.28 points. One fine-tuning seed.

    OMP_NUM_THREADS=1 python bench/lsq_tiers.py [--model cnn|transformer] [--epochs 6] [--out bench/results]

About 6-7 minutes for the CNN (bench/results/lsq_tiers.txt) and 3-5 for the transformer
(bench/results/lsq_tiers_transformer.txt) on one core of a 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import hetcomp  # noqa: E402
from hetcomp import targets  # noqa: E402
from hetcomp.evaluate import evaluate  # noqa: E402
from hetcomp.lower import digital_state_dict, lower_graph, tier_sim  # noqa: E402
from hetcomp.progress import set_quiet  # noqa: E402
from hetcomp.targets.photonic import photonic_target  # noqa: E402

# (label, target, precision in-w-out, start from: None = the float model, else the label of an LSQ row)
ROWS = [
    ("SRAM", "sram", "8-8-(7b ADC)", None),
    ("ReRAM", "reram", "8-8-(8b ADC)", None),
    ("photonic 8-8-8", "photonic8", "8-8-8", None),
    ("photonic 6-6-8", "photonic", "6-6-8", None),
    ("photonic 6-6-8 from 8-8-8 LSQ", "photonic", "6-6-8", "photonic 8-8-8"),
    ("photonic 4-4-8", "photonic4", "4-4-8", None),
    ("photonic 3-3-8", "photonic3", "3-3-8", None),
]


def build(name: str):
    if name == "cnn":
        from digits_cnn import build as builder
    else:
        from digits_transformer import build as builder
    return builder()


def accuracy(compiled_or_module, data, repeats: int, report=None) -> tuple[float, float]:
    if report is None:
        result = compiled_or_module.evaluate(data, repeats=repeats, seed=0)
    else:
        result = evaluate(compiled_or_module, report, data, repeats=repeats, seed=0)
    return result.mean, result.std


def val_accuracy(lowered, data, repeats: int) -> float:
    """Top-1 on the validation split in eval mode (inputs per call by max-abs: the compiled model's semantics)."""
    lowered.eval()
    correct = total = 0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for _ in range(repeats):
            for x, y in data["val"]:
                correct += int((lowered(x).argmax(-1) == y).sum())
                total += len(y)
    return correct / total


def lsq_finetune(model, target_set: str, example, data, epochs: int, lr: float, val_repeats: int, seed: int = 0):
    """Whole-model LSQ fine-tuning on ``target_set`` (every layer lowered): (the validation-best digital state,
    that epoch's lowered module and report, the epoch, its validation accuracy)."""
    compiled = hetcomp.compile(model, target_set, example, strategy="all-analog")
    lowered, report = lower_graph(compiled.graph, compiled.targets)
    optimizer = torch.optim.SGD(lowered.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    best = (val_accuracy(lowered, data, val_repeats), 0, digital_state_dict(lowered, report), copy.deepcopy(lowered))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            lowered.train()
            dataset = data["train"].dataset
            order = torch.randperm(len(dataset), generator=generator)
            for start in range(0, len(order), 64):
                x, y = (torch.stack(t) for t in zip(*(dataset[int(i)] for i in order[start : start + 64]),
                                                    strict=True))
                loss = F.cross_entropy(lowered(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
            val = val_accuracy(lowered, data, val_repeats)
            if val > best[0]:
                best = (val, epoch, digital_state_dict(lowered, report), copy.deepcopy(lowered))
    val, epoch, state, module = best
    return state, module.eval(), report, epoch, val


def with_state(model, state):
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(state)
    return tuned.eval()


def fmt(mean: float, std: float) -> str:
    return f"{mean:.4f}+-{std:.4f}"


def run(args: argparse.Namespace, name: str) -> list[str]:
    """One model's table (printed as it goes); returns its lines."""
    model, data = build(name)
    example = (next(iter(data["test"]))[0][:2],)
    digital = hetcomp.compile(model, "digital", example, strategy="all-digital").evaluate(data["test"], repeats=1)
    lines = [f"digits {name} ({sum(p.numel() for p in model.parameters())} parameters), every weight layer on the "
             f"tier; test split {len(data['test'].dataset)} images, accuracy mean+-std over {args.repeats} noisy "
             f"repeats; digital {digital.mean:.4f}",
             f"LSQ: whole model, {args.epochs} epochs SGD lr {args.lr} momentum 0.9 cosine, validation-best epoch "
             f"(of {len(data['val'].dataset)} validation images; 0: none beat PTQ); LAFT: hetcomp.compile(finetune="
             f"LAFT(epochs={args.laft_epochs}, lr_analog={args.lr})), layer-wise stages", "",
             f"{'tier':31s} {'in-w-out':12s} {'PTQ':>15s} {'LSQ':>15s} {'LSQ+in':>15s} {'LAFT':>15s} "
             f"{'LSQ-PTQ':>8s} {'epoch':>5s} {'s':>5s}"]
    print("\n".join(lines), flush=True)
    chosen = {label.strip() for label in args.rows.split(",") if label.strip()}
    tuned_models = {}
    for label, tier, precision, start_from in ROWS:
        if chosen and label not in chosen:
            continue
        row_start = time.perf_counter()
        base = model if start_from is None else tuned_models[start_from]
        target_set = f"{tier}+digital"
        ptq = accuracy(hetcomp.compile(base, target_set, example, strategy="all-analog"), data["test"], args.repeats)
        state, module, report, epoch, _ = lsq_finetune(base, target_set, example, data, args.epochs, args.lr,
                                                       args.val_repeats)
        tuned = with_state(base, state)
        tuned_models[label] = tuned
        lsq = accuracy(hetcomp.compile(tuned, target_set, example, strategy="all-analog"), data["test"],
                       args.repeats)
        with tier_sim.learned_input_steps():
            learned = accuracy(module, data["test"], args.repeats, report)
        laft = (math.nan, math.nan)
        if not args.no_laft:
            finetune = hetcomp.LAFT(epochs=args.laft_epochs, patience=args.laft_epochs, lr_analog=args.lr,
                                    val_data=data["val"], val_repeats=args.val_repeats, val_t_inference=None,
                                    checkpoint_dir=None)
            compiled = hetcomp.compile(base, target_set, example, data=data["train"], strategy="all-analog",
                                       finetune=finetune, hessian={"probes": 4, "max_iter": 5, "batches": 1,
                                                                   "estimator": "block"})
            laft = accuracy(compiled, data["test"], args.repeats)
        line = (f"{label:31s} {precision:12s} {fmt(*ptq):>15s} {fmt(*lsq):>15s} {fmt(*learned):>15s} "
                f"{fmt(*laft):>15s} {100 * (lsq[0] - ptq[0]):+7.2f}p {epoch:5d} {time.perf_counter() - row_start:5.0f}")
        lines.append(line)
        print(line, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("cnn", "transformer"), default="cnn")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--laft-epochs", type=int, default=3)
    parser.add_argument("--no-laft", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--val-repeats", type=int, default=2)
    parser.add_argument("--rows", default="", help="comma-separated row labels to run (default: all)")
    parser.add_argument("--out", default="bench/results",
                        help="folder for lsq_tiers.txt (cnn) / lsq_tiers_transformer.txt ('': do not write)")
    args = parser.parse_args()
    set_quiet(True)
    start = time.perf_counter()
    for bits in (8, 4, 3):
        targets.register(photonic_target(bits, name=f"photonic{bits}"), overwrite=True)
    lines = ["LSQ fine-tuning per tier (bench/lsq_tiers.py): PTQ = post-training max-abs quantization; LSQ = "
             "whole-model LSQ fine-tuning, compiled again from the carried-back weights; LSQ+in = that fine-tuned "
             "module with its learned input steps kept; LAFT = hetcomp.compile(finetune=LAFT(...)).", ""]
    lines += [*run(args, args.model), ""]
    lines.append(f"total {time.perf_counter() - start:.0f} s, torch threads {torch.get_num_threads()}")
    print(lines[-1])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = "" if args.model == "cnn" else f"_{args.model}"
        (out / f"lsq_tiers{suffix}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
