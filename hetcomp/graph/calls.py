"""How hetcomp calls a traced graph: its train/eval mode, the parameters it reads, and its placeholders' values for
an interpreter.

A torch.export graph (``ExportedProgram.module()``) refuses ``.train()`` and ``.eval()`` (NotImplementedError):
its mode was fixed when it was exported (dropout and BatchNorm are ATen ops with the mode as an argument). Its
submodules (aihwkit tiles inserted by lowering, which add training noise in train mode) still need the flag, so
``set_training`` sets it module by module where the root refuses.

An ``fx.Interpreter`` (the evaluator's prefix cache, ``FoldedRunner``) takes the graph's placeholders as positional
values. A torch.export graph flattens ``(args, kwargs)`` with its input spec (keyword inputs in the order they were
exported, whatever order a batch holds them in); an fx graph binds keyword inputs by placeholder name.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn
from torch.fx._pytree import tree_flatten_spec

from hetcomp.errors import DataError


def set_training(module: nn.Module, training: bool) -> None:
    """``module.train(training)``; for a module that refuses it (a torch.export graph), the flag is set on it
    and its submodules' ``train`` is called instead."""
    try:
        module.train(training)
    except NotImplementedError:
        module.training = training
        for child in module.children():
            set_training(child, training)


def unread_parameters(gm: fx.GraphModule) -> list[str]:
    """The names of ``gm``'s parameters that its graph never reads: neither a ``get_attr`` node's target nor inside
    a module that a ``call_module`` node calls. Lowering a layer at its graph node (the torch.export front end's
    ``aten.linear``) leaves the digital weight and bias it replaced where they are, unread, for
    ``digital_state_dict`` to write the fine-tuned weights back to: they get no gradient, so DistributedDataParallel
    must not wait for one (it raises at the next step) and the optimizer has nothing to apply."""
    read: set[int] = set()
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = gm.get_submodule(node.target) if node.op == "call_module" else graph_attribute(gm, node.target)
            values = target.parameters() if isinstance(target, nn.Module) else [target]
            read.update(id(value) for value in values)
    return [name for name, parameter in gm.named_parameters() if id(parameter) not in read]


def graph_attribute(gm: fx.GraphModule, target: str) -> Any:
    """The value a ``get_attr`` node with ``target`` (a dotted path) reads from ``gm``."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """The values of ``gm``'s placeholders, in graph order, for a call ``gm(*args, **kwargs)``."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        spec = info.in_spec
        keywords = spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple and \
            spec.child(1).type is dict  # (args, kwargs), as torch.export writes it
        structured = (tuple(args), dict(kwargs)) if keywords else tuple(args)
        try:
            return list(tree_flatten_spec(structured, spec))
        except (KeyError, IndexError, TypeError, AssertionError, RuntimeError) as error:
            raise DataError(f"the model inputs ({_describe(args, kwargs)}) do not match the inputs it was traced "
                            f"with ({error}); a batch must hold the same inputs (names) as the example inputs") \
                from None
    if not kwargs:
        return list(args)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    values = list(args)
    for node in placeholders[len(args):]:
        if node.target in kwargs:
            values.append(kwargs[node.target])
        elif node.args:  # a default value
            values.append(node.args[0])
        else:
            raise DataError(f"the model inputs ({_describe(args, kwargs)}) lack {node.target!r}, an input the model "
                            "was traced with")
    return values


def _describe(args: tuple, kwargs: dict[str, Any]) -> str:
    parts = [f"{len(args)} positional"] if args else []
    if kwargs:
        parts.append("keywords " + ", ".join(repr(k) for k in kwargs))
    return "; ".join(parts) or "none"
