"""Errors a user can act on. Each message names the cause and what to do.

Every error a user can cause is a ``HetcompError``; the CLI prints it as one line. Errors about bad
arguments, data, targets or manifests are also ``ValueError`` (a wrong type included: ``probes="3"`` is a
ConfigError), so code that catches ValueError keeps working.
"""


class HetcompError(Exception):
    """Base class: the CLI prints these as one line (a traceback only with --debug)."""


class ConfigError(HetcompError, ValueError):
    """A setting, argument or combination of them that cannot work."""


class DataError(ConfigError):
    """Data that cannot be used: wrong structure, labels out of range, NaN/Inf, empty."""


class TraceError(HetcompError, ValueError):
    """The model cannot be traced with the given example inputs."""


class TargetError(HetcompError, ValueError):
    """An unknown or malformed target or target set."""


class PassOrderError(HetcompError, ValueError):
    """A pipeline whose passes need something no earlier pass provides."""


class ManifestError(HetcompError, ValueError):
    """A manifest (or saved output folder) that is malformed, tampered with, or made for another model."""


class CheckpointError(HetcompError):
    """A checkpoint that cannot be resumed from (truncated, replaced, corrupted)."""
