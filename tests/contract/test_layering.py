"""The package's imports point down its layers, form no cycle (lazy imports included), and name no
model family outside that family's folder and the registry."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "fedumm"

# Lowest first. A module may import its own layer (without cycles) and every layer below it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        ("errors", "registry", "seeding", "progress", "io", "lru", "types", "wire", "plots", "summary"),
    ),
    ("maths and policy", ("fl",)),
    ("families, data, evaluation", ("models", "data", "eval", "comm")),
    ("config", ("config",)),
    ("sites and the round loop", ("client", "server")),
    ("engines", ("engines",)),
    ("recipes", ("experiment", "sweep", "sweep_jobs", "archive", "report")),
    ("command line", ("cli",)),
)
FAMILY_FOLDERS = ("janus", "blip3o")
# model libraries live in models/ only; comm counts paper-scale LoRA from HF configs on the meta
# device, the CLI silences their loggers
MODEL_LIBRARIES = ("transformers", "diffusers", "peft")
MODEL_LIBRARY_EXCEPTIONS = ("fedumm.comm", "fedumm.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = ("fedumm", *f.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = f
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every absolute import of the file, at any depth (functions included), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for target, _ in _imports(f):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            # importing a submodule runs its package's __init__, which is not a cycle of its own
            if target and target != m and not m.startswith(target + "."):
                graph[m].add(target)
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: in no layer of tests/contract/test_layering.py (add it)")


def test_every_module_has_a_layer():
    for m in _modules():
        if m != "fedumm":
            _layer(m)


def test_imports_point_down():
    wrong = []
    for m, targets in _graph().items():
        if m == "fedumm":
            continue
        for t in targets:
            if t != "fedumm" and _layer(t) > _layer(m):
                wrong.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})")
    assert wrong == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _family_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "models" and parts[2] in FAMILY_FOLDERS else None


def _family_names() -> dict[str, set[str]]:
    """Per family: the classes its folder defines and the model-library classes only it imports.

    A library class that two families, or any module outside the family folders, import is generic
    (``PeftModel``, ``GenerationConfig``), not a family's.
    """
    defined: dict[str, set[str]] = {f: set() for f in FAMILY_FOLDERS}
    imported: dict[str, set[str]] = {}  # library class -> the families (or "shared") importing it
    for m, path in _modules().items():
        family = _family_of(m) or "shared"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and family != "shared":
                defined[family].add(node.name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in MODEL_LIBRARIES:
                for a in node.names:
                    if a.name[:1].isupper():
                        imported.setdefault(a.asname or a.name, set()).add(family)
    for name, owners in imported.items():
        if len(owners) == 1 and (owner := next(iter(owners))) != "shared":
            defined[owner].add(name)
    # a name every family defines for itself (PretrainSpec) is a role, not one family's class
    common = set.intersection(*defined.values())
    return {f: names - common for f, names in defined.items()}


def test_family_folders_define_classes():
    names = _family_names()
    assert "JanusFamily" in names["janus"] and "JanusForConditionalGeneration" in names["janus"]
    assert "Blip3oFamily" in names["blip3o"] and "LuminaNextDiT2DModel" in names["blip3o"]


def test_no_family_is_named_outside_its_folder_and_the_registry():
    names = _family_names()
    wrong = []
    for m, path in _modules().items():
        own = _family_of(m)
        for target, line in _imports(path):
            fam = _family_of(target)
            # the registry (fedumm.models) imports each family package to register it
            if (
                fam is not None
                and fam != own
                and not (m == "fedumm.models" and target == f"fedumm.models.{fam}")
            ):
                wrong.append(f"{m}:{line} imports {target}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for fam, classes in names.items():
            if fam != own:
                wrong += [f"{m} names {c} ({fam})" for c in sorted(used & classes)]
    assert wrong == []


@pytest.mark.parametrize("library", MODEL_LIBRARIES)
def test_model_libraries_stay_in_models(library):
    wrong = []
    for m, path in _modules().items():
        if m.startswith("fedumm.models") or m in MODEL_LIBRARY_EXCEPTIONS:
            continue
        wrong += [f"{m}:{line}" for target, line in _imports(path) if target.split(".")[0] == library]
    assert wrong == []


def test_registry_lists_the_family_folders():
    from fedumm.models import family_names

    folders = sorted(p.name for p in (SRC / "models").iterdir() if (p / "__init__.py").is_file())
    assert folders == sorted(FAMILY_FOLDERS) == family_names()
    assert all(re.fullmatch(r"[a-z0-9]+", name) for name in folders)
