"""Data and metrics beyond (inputs, labels), without a model: the data format, the metric protocol, the split of
folded repeats, and the docstring retrieval task's pieces, on constructed cases."""

from collections import UserDict

import pytest
import torch

from hetcomp.data import DataFormat, first_inputs, move, take_batches
from hetcomp.errors import ConfigError, DataError
from hetcomp.evaluate import split_repeats
from hetcomp.metrics import ACCURACY, BatchMean, DatasetMetric, as_metric, split_value
from hetcomp.zoo import docstrings


def test_data_format_reads_labelled_dict_and_custom_batches():
    labelled = (torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    fmt = DataFormat()
    assert fmt.labelled(labelled) and fmt.inputs(labelled)[0][0] is labelled[0] and fmt.target(labelled) is labelled[1]
    assert fmt.samples(labelled) == 3
    hf = {"input_ids": torch.ones(4, 7, dtype=torch.long), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    assert not fmt.labelled(hf) and fmt.inputs(hf) == ((), hf) and fmt.target(hf) is hf and fmt.samples(hf) == 4
    custom = DataFormat(lambda batch: (batch["x"], batch["x"] * 2))
    batch = {"x": torch.ones(5, 2), "y": "anything"}
    args, kwargs = custom.inputs(batch)
    assert len(args) == 2 and kwargs == {} and custom.samples(batch) == 5 and custom.target(batch) is batch
    # a tokenizer's BatchEncoding is a Mapping, not a dict: read as keyword inputs, taken as a plain dict
    encoded = UserDict(hf)
    (taken,) = take_batches([encoded], None)
    assert type(taken) is dict and first_inputs([encoded]).keys() == hf.keys()
    assert move((torch.ones(1), {"a": [torch.ones(1)]}), torch.device("cpu"))[1]["a"][0].device.type == "cpu"


def test_data_format_errors():
    with pytest.raises(ConfigError, match="need loss_fn="):
        DataFormat().loss(None, torch.zeros(2), {"x": torch.zeros(2)})
    with pytest.raises(DataError, match="batch 0 is a str, not an .inputs, targets. pair.*inputs_fn="):
        take_batches(["text"], None)
    with pytest.raises(DataError, match="inputs_fn failed on a batch"):
        DataFormat(lambda batch: batch["missing"]).inputs({"x": 1})
    with pytest.raises(DataError, match="NaN or Inf"):
        DataFormat().check("data batch 0", {"x": torch.tensor([float("nan")])}, labels=False)


def test_metrics_reduce_per_batch_and_whole_dataset():
    # per-sample values are averaged over samples; a scalar is a batch mean weighted by the batch's samples
    per_sample = BatchMean(lambda outputs, target: (outputs == target).float())
    parts = [per_sample.update(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3]), 3),
             per_sample.update(torch.tensor([5]), torch.tensor([5]), 1)]
    assert per_sample.finish(parts) == pytest.approx(3 / 4)
    scalar = as_metric(lambda outputs, target: outputs.float().mean())
    assert isinstance(scalar, BatchMean)
    assert scalar.finish([scalar.update(torch.tensor([2.0, 2.0]), None, 2),
                          scalar.update(torch.tensor([5.0]), None, 1)]) == pytest.approx(3.0)
    whole = DatasetMetric(lambda outputs, target: outputs, lambda parts: {"top": float(torch.cat(parts).max()),
                                                                          "low": float(torch.cat(parts).min())}, "top")
    assert split_value(whole, whole.finish([torch.tensor([1.0, 4.0]), torch.tensor([-2.0])])) == (4.0, {"low": -2.0})
    assert as_metric(None) is ACCURACY
    with pytest.raises(ConfigError, match="metric must be None"):
        as_metric(42)
    with pytest.raises(DataError, match="needs .inputs, labels. batches.*metric="):
        ACCURACY.check(torch.zeros(2, 3), {"input_ids": torch.zeros(2)})


def test_split_repeats_is_repeat_major():
    """Folded outputs are [R*B, ...] repeat-major: repeat r's sample b sits at row r*B + b."""
    repeats, samples = 3, 4
    rows = torch.arange(repeats * samples)
    folded = {"hidden": torch.stack([rows, rows * 10], 1), "shared": torch.arange(samples), "scalar": torch.tensor(7)}
    split = split_repeats(folded, repeats, samples)
    assert len(split) == repeats
    for r, outputs in enumerate(split):
        assert outputs["hidden"][:, 0].tolist() == [r * samples + b for b in range(samples)]
        assert torch.equal(outputs["shared"], torch.arange(samples)) and int(outputs["scalar"]) == 7
    assert split_repeats({"x": torch.zeros(samples)}, repeats, samples) is None  # nothing was folded


def test_split_docstring_and_pairs_of_the_standard_library():
    query, rest = docstrings.split_docstring("Return the thing, e.g. a spam. More words follow here.\n\n"
                                             "Second paragraph.")
    assert query == "Return the thing, e.g. a spam." and rest == "More words follow here. Second paragraph."
    assert docstrings.split_docstring("Summary line without a stop\n\nBody.") == ("Summary line without a stop",
                                                                                 "Body.")
    pairs = docstrings.docstring_pairs(packages=["json"])
    assert len(pairs) >= 5 and all(p.source.startswith("json") for p in pairs)
    assert all(len(p.query.split()) >= 5 and len(p.document.split()) >= 12 for p in pairs)
    assert len({p.query.lower() for p in pairs}) == len(pairs)  # deduplicated
    again = docstrings.splits(docstrings.docstring_pairs(packages=["json"]))
    assert again == docstrings.splits(pairs) and sum(map(len, again.values())) == len(pairs)


def test_rank_metrics_and_info_nce_on_constructed_embeddings():
    eye = torch.eye(3)
    # queries 0 and 1 find their documents first; query 2 is closer to document 0 than to its own (rank 2)
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0.2]]), dim=-1)
    metrics = docstrings.rank_metrics(queries, eye)
    assert metrics["recall@1"] == pytest.approx(2 / 3) and metrics["mrr"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    hidden = torch.cat([eye, eye])[:, None, :].repeat(1, 2, 1)  # [2B, T, H]: queries then identical documents
    batch = {"attention_mask": torch.ones(6, 2, dtype=torch.long)}
    loss = docstrings.info_nce(hidden, batch)
    expected = torch.nn.functional.cross_entropy(20 * torch.eye(3), torch.arange(3))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    padded = {"attention_mask": torch.tensor([[1, 0]] * 6)}  # the masked token is left out of the mean
    noisy = hidden.clone()
    noisy[:, 1] = 100.0
    assert float(docstrings.info_nce(noisy, padded)) == pytest.approx(float(expected), rel=1e-5)
