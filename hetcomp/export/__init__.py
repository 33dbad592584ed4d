"""Export: partitioned ONNX (whole model with per-node target tags, or one graph per partition)."""

from hetcomp.export.onnx_export import export_onnx, export_onnx_split

__all__ = ["export_onnx", "export_onnx_split"]
