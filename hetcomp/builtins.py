"""hetcomp's built-in extensions, registered in this one place: the five targets (one declarative file each),
the three device simulators, the named strategies and the Hessian annotation pipeline.
``hetcomp.registry.load_builtins`` calls ``register_all`` on the first registry lookup, so importing the core
never loads them.
"""

from __future__ import annotations


def register_all() -> None:
    from hetcomp import strategies
    from hetcomp.lower.aihwkit_sim import AihwkitSimulator
    from hetcomp.lower.simulator import register_simulator
    from hetcomp.lower.tier_sim import PhotonicSimulator, PimCrossbarSimulator
    from hetcomp.partition.strategy import register_strategy
    from hetcomp.passes.base import ANNOTATION_PIPELINES
    from hetcomp.passes.hessian_pipeline import hessian_passes
    from hetcomp.targets import digital, pcm, photonic, reram, sram
    from hetcomp.targets.registry import register

    for simulator in (AihwkitSimulator(), PimCrossbarSimulator(), PhotonicSimulator()):
        register_simulator(simulator)
    for module in (digital, pcm, sram, reram, photonic):
        register(module.TARGET)
    for strategy in strategies.BUILTIN:
        register_strategy(strategy)
    ANNOTATION_PIPELINES.register("hessian", hessian_passes)
