"""A Hugging Face transformer end to end on a task that is not (inputs, labels): dict batches through the Hessian
passes, LAFT (its aten.linear weights carried back), evaluation with a whole-dataset metric on both evaluation
paths, apply_manifest with a BatchEncoding-like mapping, and partitioned ONNX of the torch.export graph.

The model is a random-init BertModel of all-MiniLM-L6-v2's architecture at tiny sizes (no weights needed; the
real model's test is tests/test_minilm.py). Batches are retrieval batches: B queries then their B documents.
"""

import dataclasses
import json
from collections import UserDict

import numpy as np
import onnx
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import hetcomp
from hetcomp.errors import ConfigError, DataError
from hetcomp.lower import digital_state_dict, lower_graph
from hetcomp.metrics import DatasetMetric
from hetcomp.targets.registry import TARGETS
from hetcomp.targets.registry import get as get_target
from hetcomp.targets.registry import register as register_target
from hetcomp.zoo import docstrings
from hetcomp.zoo.minilm import minilm_config

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

VOCAB, TOKENS = 60, 8


def tiny_bert(pooler: bool = False, layers: int = 2) -> torch.nn.Module:
    config = minilm_config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                           vocab_size=VOCAB, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=pooler).eval()


class Pairs(Dataset):
    """Token-id queries and documents; a document shares its query's first half (so retrieval is learnable)."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.queries = torch.randint(1, VOCAB, (count, TOKENS), generator=generator)
        self.documents = torch.randint(1, VOCAB, (count, TOKENS), generator=generator)
        self.documents[:, : TOKENS // 2] = self.queries[:, : TOKENS // 2]
        self.lengths = torch.randint(TOKENS // 2, TOKENS + 1, (2, count), generator=generator)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int):
        return self.queries[index], self.documents[index], self.lengths[:, index]


def collate(samples) -> dict[str, torch.Tensor]:
    """Queries then documents, with padding masked (so the attention mask matters)."""
    ids = torch.stack([q for q, _, _ in samples] + [d for _, d, _ in samples])
    lengths = torch.cat([torch.stack([n[0] for _, _, n in samples]), torch.stack([n[1] for _, _, n in samples])])
    mask = (torch.arange(TOKENS)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def loader(count: int, seed: int, batch: int = 8) -> DataLoader:
    return DataLoader(Pairs(count, seed), batch_size=batch, collate_fn=collate)


def direct_recall(model: torch.nn.Module, data: DataLoader) -> dict[str, float]:
    parts = []
    with torch.no_grad():
        for batch in data:
            embeddings = docstrings.mean_pool(model(**batch), batch["attention_mask"])
            parts.append(embeddings.chunk(2))
    return docstrings.rank_metrics(torch.cat([q for q, _ in parts]), torch.cat([d for _, d in parts]))


HESSIAN = dict(probes=2, max_iter=4, batches=2)


def test_dict_batches_through_hessian_laft_and_evaluation_with_a_whole_dataset_metric(tmp_path):
    model = tiny_bert(pooler=True)  # the pooler is unused by the loss: zero curvature, kept digital
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = loader(48, 0), loader(24, 1)
    compiled = hetcomp.compile(model, "pcm+digital", data=train, loss_fn=docstrings.info_nce,
                               metric=docstrings.retrieval_metric(), hessian=HESSIAN,
                               finetune=hetcomp.LAFT(epochs=1, patience=1, val_repeats=1, checkpoint_dir=None))
    layers = {layer["name"]: layer for layer in compiled.manifest.layers}
    assert compiled.graph.meta["hetcomp"]["frontend"] == "export"
    used = [layer for name, layer in layers.items() if layer["kind"] == "weight-static" and name != "pooler.dense"]
    assert all(layer["metrics"]["hessian_trace"] != 0 for layer in used)
    assert layers["pooler.dense"]["metrics"]["hessian_trace"] == 0 and layers["pooler.dense"]["assignment"] == "digital"
    analog = [name for name, layer in layers.items() if layer["assignment"] == "pcm"]
    assert analog, "hilal put no layer on PCM"
    task = compiled.manifest.extra["task"]
    assert task["metric"] == "recall@1" and task["loss"].endswith("info_nce")
    finetune = compiled.manifest.extra["finetune"]
    assert finetune["metric"] == "recall@1" and len(finetune["stages"]) == len(analog)
    assert all(0.0 <= stage["best_val"] <= 1.0 for stage in finetune["stages"])
    # LAFT trained the analog aten.linear layers and carried their weights back to the digital graph
    state = compiled.graph.state_dict()
    assert all(not torch.equal(state[f"{name}.weight"], reference[f"{name}.weight"]) for name in analog)
    assert not any(key.startswith("hetcomp_lowered_") for key in state)
    # the metric on both evaluation paths; the digital model's value is the hand-computed one
    folded = compiled.evaluate(test, repeats=3)
    # the exported graph reads the batch size after the first analog layer (attention's view): the folded runner
    # folds that size too, so the repeats run vectorized (tests/test_repeats_export.py checks the values)
    assert folded.method == "vectorized"
    tiles = compiled.evaluate(test, repeats=3, exact_tiles=True)
    for evaluation in (folded, tiles):
        assert evaluation.metric == "recall@1" and set(evaluation.others) == {"mrr"}
        assert len(evaluation.values) == 3 and all(0.0 <= v <= 1.0 for v in evaluation.values)
    # saved and loaded: the fine-tuned weights and the same evaluation (the metric is given again: it is code)
    loaded = hetcomp.load(compiled.save(tmp_path / "out", onnx=False), tiny_bert(pooler=True), next(iter(train)))
    again = loaded.evaluate(test, repeats=3, exact_tiles=True, metric=docstrings.retrieval_metric())
    assert again.values == tiles.values and again.others == tiles.others
    digital = hetcomp.compile(compiled.graph, "pcm+digital", example_inputs=next(iter(test)), strategy="all-digital")
    exact = digital.evaluate(test, repeats=2, metric=docstrings.retrieval_metric())
    expected = direct_recall(compiled.graph, test)
    assert exact.values == [pytest.approx(expected["recall@1"])] * 2
    assert exact.others["mrr"] == [pytest.approx(expected["mrr"])] * 2


def test_a_per_batch_metric_and_inputs_fn_on_custom_batches():
    """Batches of another structure, read by inputs_fn; a per-batch metric reduced over the data."""
    model = tiny_bert()

    def inputs(batch):
        return {"input_ids": batch["tokens"], "attention_mask": batch["mask"]}

    def as_custom(data):
        return [{"tokens": b["input_ids"], "mask": b["attention_mask"], "note": "ignored"} for b in data]

    train, test = as_custom(loader(16, 0)), as_custom(loader(16, 1))

    def loss(outputs, batch):
        return docstrings.info_nce(outputs, {"attention_mask": batch["mask"]})

    def norm(outputs, batch):  # one value per sequence
        return outputs.last_hidden_state.norm(dim=-1).mean(-1)

    compiled = hetcomp.compile(model, "pcm+digital", data=train, inputs_fn=inputs, loss_fn=loss, metric=norm,
                               strategy="first-last-digital")
    evaluation = compiled.evaluate(test, repeats=2)
    assert evaluation.metric == "norm" and compiled.manifest.extra["task"]["inputs"].endswith("inputs")
    with torch.no_grad():
        expected = torch.cat([norm(model(**inputs(b)), b) for b in test]).mean()
    assert evaluation.mean == pytest.approx(float(expected), rel=0.05)  # PCM noise: close to digital
    assert evaluation.values[0] != evaluation.values[1]  # independent repeats
    with pytest.raises(ConfigError, match="inputs_fn= reads batches of any structure"):
        hetcomp.compile(model, "pcm+digital", data=train, inputs_fn=inputs, strategy="first-last-digital",
                        hessian=HESSIAN)
    with pytest.raises(ConfigError, match="need loss_fn="):
        hetcomp.compile(model, "pcm+digital", data=loader(16, 0), strategy="hilal", hessian=HESSIAN)
    with pytest.raises(DataError, match="needs .inputs, labels. batches.*metric="):
        hetcomp.compile(model, "pcm+digital", example_inputs={"input_ids": test[0]["tokens"][:2]},
                        strategy="first-last-digital").evaluate(
            [{"input_ids": b["tokens"]} for b in test], repeats=1)


def test_lowered_aten_linear_weights_go_back_to_their_parameters():
    """digital_state_dict maps an inserted module's weights to the aten.linear node's parameters (exactly what was
    programmed), and leaves the inserted module's own state out, so the digital graph loads it strictly."""
    model = tiny_bert()
    example = next(iter(loader(8, 0)))
    compiled = hetcomp.compile(model, "pcm+digital", example_inputs=example, strategy="first-last-digital")
    lowered, report = lower_graph(compiled.graph, compiled.targets)
    entry = report["encoder.layer.0.attention.self.value"]
    assert entry["module"].startswith("hetcomp_lowered_") and entry["weight_param"].endswith("value.weight")
    torch.manual_seed(1)
    weight, bias = torch.randn(32, 32) * 0.1, torch.randn(32) * 0.1
    lowered.get_submodule(entry["module"]).set_weights(weight, bias)
    state = digital_state_dict(lowered, report)
    torch.testing.assert_close(state[entry["weight_param"]], weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state[entry["bias_param"]], bias)
    assert not any(key.startswith("hetcomp_lowered_") for key in state)
    compiled.graph.load_state_dict(state)  # strict: exactly the digital graph's keys
    assert torch.equal(compiled.graph.state_dict()[entry["weight_param"]], state[entry["weight_param"]])


def test_apply_manifest_with_a_tokenizer_style_mapping():
    model = tiny_bert()
    example = UserDict(next(iter(loader(8, 0))))  # a BatchEncoding is a Mapping, not a dict
    compiled = hetcomp.compile(model, "pcm+digital", example_inputs=example, strategy="first-last-digital")
    again = hetcomp.apply_manifest(model, compiled.manifest, example)
    assert [layer["assignment"] for layer in again.manifest.layers] == \
        [layer["assignment"] for layer in compiled.manifest.layers]


def test_partitioned_onnx_of_an_export_front_end_model(tmp_path):
    model = tiny_bert(layers=1)
    example = next(iter(loader(8, 0, batch=2)))
    compiled = hetcomp.compile(model, "pcm+digital", example_inputs=example, strategy="first-last-digital")
    path = compiled.export_onnx(tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    # another batch size and sequence length, with padding: dynamic shapes, mask honoured
    batch = next(iter(loader(10, 3, batch=5)))
    batch = {key: value[:, :6] for key, value in batch.items()}
    feeds = {key: value.numpy() for key, value in batch.items()}
    with torch.no_grad():
        expected = model(**batch).last_hidden_state.numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {i.name: feeds[i.name] for i in proto.graph.input})
    np.testing.assert_allclose(got, expected, atol=1e-5)
    tags = {}
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type in ("MatMul", "Gemm") and "hetcomp.layer" in meta:
            tags.setdefault(meta["hetcomp.layer"], []).append(meta["hetcomp.target"])
    assert tags == {layer["name"]: [layer["assignment"]] for layer in compiled.manifest.layers}
    embedded = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(embedded["hetcomp.manifest"])["model"]["frontend"] == "export"
    # one graph per contiguous partition, chained in onnxruntime
    directory = compiled.export_onnx(tmp_path / "parts", split=True)
    spec = json.loads((directory / "partitions.json").read_text())
    assert [p["target"] for p in spec["partitions"]][:2] == ["digital", "pcm"] and len(spec["partitions"]) >= 3
    values = dict(feeds)
    for part in spec["partitions"]:
        file = directory / part["file"]
        onnx.checker.check_model(onnx.load(str(file)), full_check=True)
        outputs = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"]).run(
            None, {name: values[name] for name in part["inputs"]})
        values.update(zip(part["outputs"], outputs))
    np.testing.assert_allclose(values[spec["outputs"][0]], expected, atol=1e-5)


class Encoder(torch.nn.Module):
    """An fx-traceable sentence-encoder stand-in: its graph folds hardware repeats into the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.outer = torch.nn.Linear(6, 16), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.inner(x)))


def _pairs(outputs, batch):
    return torch.nn.functional.normalize(outputs, dim=-1).chunk(2)


def _rank(parts):
    return docstrings.rank_metrics(torch.cat([q for q, _ in parts]), torch.cat([d for _, d in parts]))


@pytest.fixture
def silent_pcm():
    """PCM with every noise source off (quantization only): every hardware repeat computes the same. Registered for
    the test only, so the target table other tests see is unchanged."""
    pcm = get_target("pcm")
    register_target(dataclasses.replace(pcm, name="pcm-silent", device={
        **pcm.device, "out_noise": 0.0, "prog_noise_scale": 0.0, "read_noise_scale": 0.0, "drift_scale": 0.0}),
        overwrite=True)
    yield "pcm-silent"
    TARGETS.unregister("pcm-silent")


def test_whole_dataset_metric_on_folded_repeats_equals_the_tile_path(silent_pcm):
    """Folded outputs are split per repeat (repeat-major) before the metric sees them: with the device's noise off
    every repeat equals the one-repeat-at-a-time path exactly, and a split that mixed repeats and samples would
    pair queries with the wrong documents. With noise on, the folded repeats differ from each other."""
    torch.manual_seed(0)
    model = Encoder().eval()
    generator = torch.Generator().manual_seed(4)
    data = []
    for _ in range(3):
        queries = torch.randn(8, 6, generator=generator)
        data.append({"x": torch.cat([queries, queries + 0.6 * torch.randn(8, 6, generator=generator)])})
    metric = DatasetMetric(_pairs, _rank, "recall@1")

    def inputs(batch):
        return batch["x"]

    for target, noisy in ((f"{silent_pcm}+digital", False), ("pcm+digital", True)):
        compiled = hetcomp.compile(model, target, example_inputs=(data[0]["x"],), inputs_fn=inputs, metric=metric,
                                   strategy="all-analog")
        folded = compiled.evaluate(data, repeats=4)
        assert folded.method == "vectorized" and folded.metric == "recall@1"
        if noisy:
            assert len(set(folded.others["mrr"])) > 1  # the repeats are told apart
            continue
        tiles = compiled.evaluate(data, repeats=4, exact_tiles=True)
        assert tiles.method.startswith("tiles")
        assert folded.values == pytest.approx(tiles.values)
        assert folded.others["mrr"] == pytest.approx(tiles.others["mrr"])
        with torch.no_grad():
            expected = _rank([_pairs(compiled.module(b["x"]), b) for b in data])
        assert folded.values == [pytest.approx(expected["recall@1"])] * 4
        assert 0.0 < expected["recall@1"] < 1.0  # a metric the pairing decides
