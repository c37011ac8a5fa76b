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


# ---------------------------------------------------------------- the config at module borders

# DESIGN: config keys map one to one onto the arguments of the functions they configure. Only the
# entries see the whole Config; tunelab.compose splits it into the sections each function below takes.
ENTRIES = {"tunelab.run", "tunelab.compose", "tunelab.api", "tunelab.config", "tunelab.defaults", "tunelab.plan"}
# Below the entries, the functions that still take the whole Config, each with why (module, function):
WHOLE_CONFIG_ALLOWED = {
    # the model card renders the run's configuration (model, task, method, train, optim, schedule,
    # lora) as a document, as config.yaml does: its subject is the config as a whole
    ("tunelab.model_card", "_front_matter"), ("tunelab.model_card", "_hyperparameters"),
    ("tunelab.model_card", "_usage"), ("tunelab.model_card", "model_card"), ("tunelab.model_card", "write_model_card"),
    # a resume compares the config with the run's config.yaml key by key (IDENTITY_KEYS, seven sections)
    ("tunelab.run_dir", "check_same_run"),
}


def _is_entry(module: str) -> bool:
    return (module in ENTRIES or module.startswith(("tunelab.cli", "tunelab.plan."))
            or module == "tunelab")  # the package's lazy public names (tunelab.Config)


def _names_config(annotation: ast.expr | None) -> bool:
    """Whether an annotation names the top-level Config class (Config, config.Config, "Config | None")."""
    if annotation is None:
        return False
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return False
    return any((isinstance(n, ast.Name) and n.id == "Config") or (isinstance(n, ast.Attribute) and n.attr == "Config")
               or (isinstance(n, ast.Constant) and isinstance(n.value, str) and _names_config(n))
               for n in ast.walk(annotation))


def whole_config_uses() -> list[str]:
    """Below the entries: every parameter annotated Config, every parameter named `cfg` without an
    annotation (the name the entries give the whole config; anything else says what it is), and every
    read of an attribute `.cfg` (a run.Recipe's whole config carried below), as module.function(name)."""
    found = []
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if _is_entry(module):
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            name = getattr(fn, "name", "<lambda>")
            a = fn.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]:
                bad = _names_config(arg.annotation) or (arg.arg == "cfg" and arg.annotation is None)
                if bad and (module, name) not in WHOLE_CONFIG_ALLOWED:
                    found.append(f"{module}.{name}({arg.arg})")
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and node.attr == "cfg" and (module, name) not in WHOLE_CONFIG_ALLOWED:
                    found.append(f"{module}.{name}: .cfg at line {node.lineno}")
    return sorted(set(found))


def test_the_whole_config_check_sees_what_it_looks_for():
    for text in ("def f(cfg: Config): pass", "def f(x: 'Config | None'): pass", "def f(cfg): pass",
                 "def f(c: config.Config): pass", "def f(r): return r.cfg.train"):
        fn = ast.parse(text).body[0]
        params = [*fn.args.args]
        assert (any(_names_config(p.annotation) or (p.arg == "cfg" and p.annotation is None) for p in params)
                or any(isinstance(n, ast.Attribute) and n.attr == "cfg" for n in ast.walk(fn))), text
    for text in ("def f(cfg: DataConfig): pass", "def f(data_cfg): pass", "def f(model_config: 'ModelConfig'): pass"):
        fn = ast.parse(text).body[0]
        assert not any(_names_config(p.annotation) or (p.arg == "cfg" and p.annotation is None) for p in fn.args.args)


def test_no_function_below_the_entries_takes_the_whole_config():
    """tasks/, train/, data/, models/, evaluate/, distributed/, monitor/, analysis/, export/ and the
    top-level helpers take the sections they read (tunelab.compose hands them over)."""
    assert whole_config_uses() == []
