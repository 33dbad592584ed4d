"""The target registry and target-set parsing.

A target set is written as a ``+``-joined string (``"pcm+digital"``); order does not matter. Built-in targets
are registered by ``hetcomp.builtins`` on first use; ``register`` adds a user's own, ``load_file`` one
described as data in a TOML file (reusing a registered simulator: no Python needed).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from hetcomp.errors import TargetError
from hetcomp.registry import Registry
from hetcomp.targets.base import Target, TargetSet

TARGETS: Registry[Target] = Registry("target", TargetError, "add your own with hetcomp.targets.register or a TOML "
                                     "target file", check=lambda entry: isinstance(entry, Target))


def register(target: Target, *, overwrite: bool = False) -> Target:
    """Add a target to the registry so target strings can name it."""
    if not isinstance(target, Target):
        raise TargetError(f"register() takes a hetcomp.targets.Target, got {type(target).__name__}")
    return TARGETS.register(target.name, target, overwrite=overwrite)


def get(name: str) -> Target:
    return TARGETS.get(name)


def available() -> list[str]:
    return TARGETS.names()


def load_file(path: str | Path, *, overwrite: bool = False) -> Target:
    """Register the target a TOML file describes (the fields of ``Target.to_dict``: name, description,
    analog, supports, precision, tile, cost, accuracy_rank, simulator, device) and return it. The simulator
    it names must be registered (a built-in one: aihwkit, pim-crossbar, photonic)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TargetError(f"no target file at {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TargetError(f"target file {path} is not valid TOML ({err})") from None
    target = Target.from_dict(data)
    if target.simulator is not None:
        from hetcomp.lower import simulator_named

        simulator_named(target.simulator).check(target)  # unknown simulators or settings fail here, not later
    return register(target, overwrite=overwrite)


def parse(spec: str | TargetSet | Target | list[str] | tuple[str, ...]) -> TargetSet:
    """Parse ``"pcm+digital"`` (or a list of names) into a TargetSet.

    Errors: empty string or empty component, duplicate names, unknown names (the message lists the
    known ones).
    """
    if isinstance(spec, TargetSet):
        return spec
    if isinstance(spec, Target):
        return TargetSet((spec,))
    if isinstance(spec, str):
        if not spec.strip():
            raise TargetError("empty target string; write targets joined by '+', e.g. 'pcm+digital'")
        names = [part.strip() for part in spec.split("+")]
    elif isinstance(spec, list | tuple):
        names = [str(part).strip() for part in spec]
    else:
        raise TargetError(f"target must be a string like 'pcm+digital', got {type(spec).__name__}")
    if not names or any(not n for n in names):
        raise TargetError(f"empty target name in {spec!r}; write targets joined by '+', e.g. 'pcm+digital'")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TargetError(f"duplicate target(s) {', '.join(duplicates)} in {spec!r}; name each target once")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise TargetError(
            f"unknown target(s) {', '.join(map(repr, unknown))}; known targets: {', '.join(available())}"
            " (add your own with hetcomp.targets.register or a TOML target file)"
        )
    return TargetSet.of([TARGETS.get(n) for n in names])
