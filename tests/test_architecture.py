"""The import structure: no circles between packages, and the loop's package points nowhere up.

Every import counts, function-level (lazy) ones included: a lazy import still makes the two
modules depend on each other. Read with ast, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import tunelab

pytestmark = pytest.mark.unit

SRC = Path(tunelab.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """tunelab module -> the tunelab modules it imports (by dotted name, packages as their __init__)."""
    out: dict[str, set[str]] = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("tunelab.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab."):
                deps.add(node.module)
        out[name] = deps - {name}
    return out


def unit(module: str) -> str:
    """The package-level unit of a module: tunelab.train.loop -> train; tunelab.run -> run."""
    return module.split(".")[1] if "." in module else module


def package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, deps in module_imports().items():
        for d in deps:
            if unit(d) != unit(mod):
                edges[unit(mod)].add(unit(d))
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_packages():
    assert cycles(package_edges()) == []


def test_the_loop_package_imports_nothing_above_it():
    """train/ owns its contracts (train.protocols); tasks/ and distributed/ implement them."""
    up = package_edges()["train"] & {"distributed", "tasks", "run", "run_dir", "plan", "cli", "evaluate", "analysis"}
    assert up == set()


def test_the_loop_module_reads_only_train_and_data():
    deps = {unit(d) for d in module_imports()["tunelab.train.loop"]}
    assert deps <= {"train", "data"}


def test_evaluate_does_not_import_tasks():
    assert "tasks" not in package_edges()["evaluate"]


def test_no_import_circle_between_the_models_modules():
    """load.py <-> lora.py was one: quantisation, adapters and saved-folder loading are apart now."""
    mods = {m: {d for d in deps if d.startswith("tunelab.models.")} for m, deps in module_imports().items()
            if m.startswith("tunelab.models.")}
    assert cycles(mods) == []


def test_the_implementations_satisfy_the_loop_protocols(tmp_path):
    import torch

    from tunelab.distributed.ddp import DataParallel, SharedRunIO
    from tunelab.distributed.group import ALONE
    from tunelab.run_dir import RunDir
    from tunelab.train.protocols import LoopIO, OneProcess, Replicas

    assert isinstance(OneProcess(torch.nn.Linear(1, 1), lambda m, b: None), Replicas)
    assert all(callable(getattr(DataParallel, name)) for name in ("share", "accumulating", "loss", "sum", "any", "on_main"))
    assert isinstance(SharedRunIO(None, ALONE), LoopIO)
    assert all(callable(getattr(RunDir, name)) for name in ("log", "save", "stop_requested"))
