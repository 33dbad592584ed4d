"""Everything hetcomp writes and reads back goes through here, so every output has the same guarantees.

- ``hetcomp.storage.files``: ``write_atomic`` (a crash leaves the old file or the new one, never half of
  one), ``replace_directory`` (an output folder swapped in as one unit), ``sha256_bytes``/``sha256_file``.
- ``hetcomp.storage.checkpoints``: resumable runs, one mechanism for the three searches that checkpoint
  (LAFT, the mac-greedy search, row remap): ``run_key`` (the hash of everything a step's result depends
  on) and ``StepLog`` (``<root>/<run key>/progress.json``: per finished step a JSON record and optionally a
  safetensors file with its size and SHA-256, verified on resume; ``CheckpointError`` names the file and
  the fix).

What a manifest says about a model (``fingerprint``, ``weights_hash``, ``data_hash``) stays in
hetcomp.manifest; this package is about files.
"""

from hetcomp.storage.checkpoints import StepLog, run_key, step_file
from hetcomp.storage.files import replace_directory, sha256_bytes, sha256_file, write_atomic

__all__ = ["StepLog", "replace_directory", "run_key", "sha256_bytes", "sha256_file", "step_file", "write_atomic"]
