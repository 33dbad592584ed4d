"""The torch.export front end on Hugging Face transformers (random-init BERT and GPT-NeoX, no download)."""

import pytest
import torch

import hetcomp
from hetcomp.errors import TraceError
from hetcomp.lower import tier_sim

transformers = pytest.importorskip("transformers")

TIERS = "sram+reram+photonic"
BATCH, TOKENS, DIM, MLP, LAYERS = 2, 16, 64, 128, 2


def _bert():
    config = transformers.BertConfig(hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=MLP, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (BATCH, TOKENS))
    return transformers.BertModel(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _neox():
    config = transformers.GPTNeoXConfig(hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=4,
                                        intermediate_size=4 * DIM, vocab_size=100, max_position_embeddings=64,
                                        use_cache=False)
    torch.manual_seed(0)
    return transformers.GPTNeoXModel(config).eval(), {"input_ids": torch.randint(0, 100, (BATCH, TOKENS)),
                                                      "use_cache": False}


def _macs(layers):
    return {layer["name"]: layer["macs"] for layer in layers}


def test_bert_layers_macs_and_noise_free_equivalence():
    model, inputs = _bert()
    compiled = hetcomp.compile(model, TIERS, example_inputs=inputs, strategy="equal-split")
    layers = compiled.manifest.layers
    static = [layer for layer in layers if layer["kind"] == "weight-static"]
    dynamic = [layer for layer in layers if layer["kind"] == "dynamic"]
    assert len(static) == 6 * LAYERS + 1  # q, k, v, attention out, intermediate, output per layer + pooler
    assert len(dynamic) == 2 * LAYERS  # each attention: scores and context
    macs = _macs(layers)
    # hand count, per sample: a linear is tokens x in x out; the pooler sees one token
    assert macs["encoder.layer.0.attention.self.query"] == TOKENS * DIM * DIM
    assert macs["encoder.layer.1.intermediate.dense"] == TOKENS * DIM * MLP
    assert macs["encoder.layer.1.output.dense"] == TOKENS * MLP * DIM
    assert macs["pooler.dense"] == DIM * DIM
    # scores: heads x tokens x tokens x head_dim = tokens^2 x dim; context the same
    assert macs["encoder.layer.0.attention.self.scores"] == TOKENS * TOKENS * DIM
    assert macs["encoder.layer.0.attention.self.context"] == TOKENS * TOKENS * DIM
    assert {layer["assignment"] for layer in dynamic} == {"photonic"}
    with torch.no_grad():
        reference = model(**inputs)
        with tier_sim.ideal():
            ideal = compiled.module(**inputs)
        noisy = compiled.module(**inputs)
    assert torch.allclose(ideal.last_hidden_state, reference.last_hidden_state, atol=1e-5)
    assert torch.allclose(ideal.pooler_output, reference.pooler_output, atol=1e-5)
    assert not torch.allclose(noisy.last_hidden_state, reference.last_hidden_state, atol=1e-4)


def test_gpt_neox_compiles_with_the_pareto_search():
    model, inputs = _neox()
    compiled = hetcomp.compile(model, TIERS, example_inputs=inputs,
                               strategy=hetcomp.strategies.pareto(population=12, generations=3, remap=False))
    macs = _macs(compiled.manifest.layers)
    assert len(macs) == 4 * LAYERS + 2 * LAYERS  # qkv, dense, h_to_4h, 4h_to_h + scores, context
    assert macs["layers.0.attention.query_key_value"] == TOKENS * DIM * 3 * DIM
    assert macs["layers.1.mlp.dense_4h_to_h"] == TOKENS * 4 * DIM * DIM
    assert compiled.graph.meta["hetcomp"]["frontend"] == "export"
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
        with tier_sim.ideal():
            assert torch.allclose(compiled.module(**inputs).last_hidden_state, reference, atol=1e-5)


def test_keyword_inputs_need_the_export_front_end():
    model, inputs = _bert()
    with pytest.raises(TraceError, match="keyword example inputs need the torch.export front end"):
        hetcomp.trace(model, inputs, frontend="fx")
    with pytest.raises(TraceError, match="unknown front end"):
        hetcomp.trace(model, inputs, frontend="onnx")
