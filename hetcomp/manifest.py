"""The partition manifest: the JSON record of what was decided for each layer, and why.

Schema (``schema_version`` 1): model fingerprint (architecture + weights), target set with each target's
parameters, strategy, seed, per-layer records (name, kind, op, shape, rows, macs, params, metrics, assignment,
reason; a row-split layer also ``row_tiers``, each row's tier compactly), pass timings and settings, and a summary
with the MAC ratio per target. Written atomically; loaded with ``json`` only (never unpickled). NaN metrics are
written as null.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from hetcomp.errors import ManifestError
from hetcomp.graph.layers import LayerAnnotation, mappable_nodes

SCHEMA_VERSION = 1


def fingerprint(gm: fx.GraphModule, model: nn.Module) -> dict[str, str]:
    """Architecture hash (traced code + parameter names/shapes/dtypes) and weights hash (tensor bytes)."""
    state = model.state_dict()
    arch = hashlib.sha256(gm.code.encode())
    weights = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        arch.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        weights.update(key.encode())
        weights.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return {"class": type(model).__name__, "architecture": arch.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


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
        assignment = layer["assignment"]
        if isinstance(assignment, dict):
            for target, rows in assignment.items():
                macs[target] += layer["macs"] * rows / layer["rows"]
                counts[target] += 1
        elif assignment is not None:
            macs[assignment] += layer["macs"]
            counts[assignment] += 1
    ratio = {t: macs[t] / total for t in target_names}
    return {"total_macs": int(total), "mac_ratio": ratio, "layers": counts}


@dataclass
class Manifest:
    model: dict[str, str]
    target_set: str
    targets: list[dict[str, Any]]
    strategy: str
    seed: int
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, model: nn.Module, targets, strategy: str, seed: int,
                   records: list | None = None, extra: dict | None = None) -> Manifest:
        layers = [layer_record(a) for _, a in mappable_nodes(gm)]
        return cls(
            model=fingerprint(gm, model), target_set=str(targets), targets=[t.to_dict() for t in targets],
            strategy=strategy, seed=seed, layers=layers, summary=mac_summary(layers, targets.names),
            passes=[asdict(r) for r in (records or [])], extra=extra or {},
        )

    def layer(self, name: str) -> dict[str, Any]:
        for layer in self.layers:
            if layer["name"] == name:
                return layer
        raise KeyError(f"no layer {name!r} in the manifest")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        order = ["schema_version", "model", "target_set", "strategy", "seed", "summary", "layers", "targets",
                 "passes", "extra"]
        return _json_safe({key: data[key] for key in order})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | os.PathLike) -> Path:
        return write_atomic(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError("a manifest is a JSON object; this file holds something else")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {version!r} is not supported (this hetcomp reads {SCHEMA_VERSION})"
            )
        required = ["model", "target_set", "targets", "strategy", "seed", "layers", "summary"]
        missing = [key for key in required if key not in data]
        if missing:
            raise ManifestError(f"manifest is missing {', '.join(missing)}; was it written by hetcomp?")
        fields = {key: data[key] for key in required}
        return cls(**fields, passes=data.get("passes", []), extra=data.get("extra", {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ManifestError(f"no manifest at {path}; pass the manifest.json that compile() saved") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
        return cls.from_dict(data)


def write_atomic(path: Path, content: str | bytes) -> Path:
    """Write to a temporary file in the same folder, then rename: no half-written file on a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(content, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
