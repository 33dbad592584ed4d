"""The partition manifest: the JSON record of what was decided for each layer, and why.

Schema (``schema_version`` 3, published as ``hetcomp/manifest.schema.json``, JSON Schema 2020-12): model
fingerprint (class, architecture, the input weights and the compiled weights, front end), target set with each
target's whole definition, strategy, seed, a hash of the calibration data, per-layer records (name, kind, op,
shape, rows, macs, params, metrics, assignment, reason; a row-split layer also ``row_tiers``, each row's tier
compactly), pass timings and settings, and a summary (MAC ratio, layers and estimated latency/energy per
target). Written atomically; read with ``json`` only (never unpickled) and validated against the schema;
``hetcomp.load`` then checks it layer by layer against the traced model and recomputes the summary. NaN
metrics are written as null.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from hetcomp.errors import ManifestError
from hetcomp.graph.layers import LayerAnnotation, mappable_nodes
from hetcomp.storage import write_atomic

SCHEMA_VERSION = 3


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the state dict's names and tensor bytes (parameters and buffers, sorted by name)."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fingerprint(gm: fx.GraphModule, model: nn.Module) -> dict[str, str]:
    """Class, architecture hash (traced code, the modules' reprs, parameter names/shapes/dtypes) and weights hash."""
    state = model.state_dict()
    arch = hashlib.sha256(gm.code.encode())
    arch.update(repr(model).encode())  # module settings the code does not show: activation classes, eps, dropout p
    for key in sorted(state):
        arch.update(f"{key}:{tuple(state[key].shape)}:{state[key].dtype};".encode())
    return {"class": type(model).__name__, "architecture": arch.hexdigest()[:16], "weights": weights_hash(model)}


def data_hash(batches: list[tuple[Any, ...]]) -> str:
    """SHA-256 of the tensors in ``batches`` (structure-aware: names, shapes and dtypes are hashed too)."""
    digest = hashlib.sha256()

    def feed(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{path}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                feed(value[key], f"{path}.{key}")
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                feed(item, f"{path}[{index}]")
        else:
            digest.update(f"{path}={value!r};".encode())

    feed(list(batches), "data")
    return digest.hexdigest()


@functools.cache
def schema() -> dict[str, Any]:
    """The manifest's JSON Schema (``hetcomp/manifest.schema.json``)."""
    return json.loads(resources.files("hetcomp").joinpath("manifest.schema.json").read_text())


def validate_schema(data: Any) -> None:
    """Raise ManifestError naming the first place where ``data`` breaks the schema."""
    import jsonschema

    if not isinstance(data, dict):
        raise ManifestError(f"a manifest is a JSON object; this one is a {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"manifest schema_version {version!r} is not supported (this hetcomp reads "
                            f"{SCHEMA_VERSION}); re-compile the model with this hetcomp")
    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"manifest is malformed at {where}: {error.message[:200]}")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def layer_record(annotation: LayerAnnotation) -> dict[str, Any]:
    layer = annotation.layer
    return {
        "name": layer.name,
        "kind": layer.kind,
        "op": layer.op,
        "shape": list(layer.weight_shape),
        "rows": layer.rows,
        "macs": layer.macs,
        "params": layer.params,
        "groups": layer.groups,
        "metrics": dict(annotation.metrics),
        "assignment": annotation.assignment,
        "reason": annotation.reason,
        **({"row_tiers": encode_row_targets(annotation.row_targets)} if annotation.row_targets else {}),
    }


def encode_row_targets(row_targets: list[str]) -> dict[str, Any]:
    """Compact per-row tiers: ``{"tiers": [names], "codes": "0120..."}``, one character per row (index into
    tiers), so a 2048-row layer costs 2 KB in the manifest instead of a list of 2048 names."""
    tiers = sorted(set(row_targets), key=row_targets.index)
    if len(tiers) > 36:
        raise ManifestError("more than 36 tiers in one layer cannot be encoded")
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    index = {tier: digits[i] for i, tier in enumerate(tiers)}
    return {"tiers": tiers, "codes": "".join(index[t] for t in row_targets)}


def decode_row_targets(record: dict[str, Any] | None) -> list[str] | None:
    if not record:
        return None
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    try:
        return [record["tiers"][digits.index(code)] for code in record["codes"]]
    except (KeyError, ValueError, IndexError, TypeError):
        raise ManifestError("a layer's row_tiers is malformed; expected {'tiers': [...], 'codes': '...'}") from None


def mac_summary(layers: list[dict[str, Any]], target_names: list[str]) -> dict[str, Any]:
    """MAC ratio and layer count per target; row-split layers count each target's share of rows."""
    macs = dict.fromkeys(target_names, 0.0)
    counts = dict.fromkeys(target_names, 0)
    total = sum(layer["macs"] for layer in layers) or 1
    for layer in layers:
        for target, rows in assigned_rows(layer).items():
            macs[target] += layer["macs"] * rows / layer["rows"]
            counts[target] += 1
    ratio = {t: macs[t] / total for t in target_names}
    return {"total_macs": int(total), "mac_ratio": ratio, "layers": counts}


def assigned_rows(layer: dict[str, Any]) -> dict[str, int]:
    """{target: rows} of a layer record (a whole layer is all its rows on one target)."""
    assignment = layer["assignment"]
    if isinstance(assignment, dict):
        return dict(assignment)
    return {} if assignment is None else {assignment: layer["rows"]}


@dataclass
class Manifest:
    model: dict[str, Any]
    target_set: str
    targets: list[dict[str, Any]]
    strategy: str
    seed: int
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    calibration: dict[str, Any] | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    hetcomp_version: str = ""
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def layer_records(gm: fx.GraphModule) -> list[dict[str, Any]]:
        return [layer_record(a) for _, a in mappable_nodes(gm)]

    def layer(self, name: str) -> dict[str, Any]:
        for layer in self.layers:
            if layer["name"] == name:
                return layer
        raise KeyError(f"no layer {name!r} in the manifest")

    @property
    def finetuned(self) -> bool:
        """Whether the compile changed the weights (the saved weights differ from the input model's)."""
        return self.model["compiled_weights"] != self.model["weights"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        order = ["schema_version", "hetcomp_version", "model", "target_set", "strategy", "seed", "calibration",
                 "summary", "layers", "targets", "passes", "extra"]
        return _json_safe({key: data[key] for key in order})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | os.PathLike) -> Path:
        return write_atomic(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """A manifest from parsed JSON, validated against the schema (structure only: ``hetcomp.load``
        checks it against the model and the targets)."""
        validate_schema(data)
        names = [layer["name"] for layer in data["layers"]]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ManifestError(f"manifest lists layer(s) {duplicates} more than once")
        fields = {key: data[key] for key in ("model", "target_set", "targets", "strategy", "seed", "layers",
                                               "summary")}
        return cls(**fields, calibration=data.get("calibration"), passes=data.get("passes", []),
                   extra=data.get("extra", {}), hetcomp_version=data.get("hetcomp_version", ""))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read ``path`` (a manifest.json, or a folder holding one). Every failure is a ManifestError."""
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise ManifestError(f"no manifest at {path}; pass the folder or manifest.json that save() wrote") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ManifestError(f"cannot read {path} as UTF-8 text ({type(err).__name__}); is it a manifest?") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
        except RecursionError:
            raise ManifestError(f"{path} is nested too deeply to be a manifest") from None
        return cls.from_dict(data)
