"""Errors a user can act on. Each message names the cause and what to do."""


class HetcompError(Exception):
    """Base class: the CLI prints these as one line (a traceback only with --debug)."""


class TraceError(HetcompError):
    pass


class TargetError(HetcompError):
    pass


class PassOrderError(HetcompError):
    pass


class ManifestError(HetcompError):
    pass


class ConfigError(HetcompError):
    pass
