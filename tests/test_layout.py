"""The layout's rules, checked on the source: one installed namespace, layers that point one way
(bot → plugins → models → pipeline), no import cycle (lazy imports inside functions count too), and a
wheel that lists every package."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"corefbot": "bot", "corefbot.plugins": "plugins", "corefbot.models": "models",
                "corefbot.pipeline": "pipeline"}


def module_files() -> dict[str, Path]:
    """Installed module name → file, following pyproject's package-dir mapping."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "corefbot" and parts and parts[0] in ("plugins", "models", "pipeline"):
                continue
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every corefbot module ``name`` imports anywhere in its file (module level or inside functions)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def external_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_imports() -> None:
    edges = graph()
    # serve/resolver imports the llama backend only inside load_backend: the graph must still see it
    assert "corefbot.models.serve.llama" in edges["corefbot.models.serve.resolver"]
    assert "corefbot.pipeline.records" in edges["corefbot.pipeline.store"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_layers_point_one_way() -> None:
    edges = graph()
    files = module_files()
    plugins_, models_, pipeline_ = "corefbot.plugins", "corefbot.models", "corefbot.pipeline"
    wrong = []
    for name, targets in edges.items():
        for target in targets:
            if name.startswith(pipeline_) and not target.startswith(pipeline_):
                wrong.append((name, target))
            elif name.startswith(models_) and not target.startswith((models_, pipeline_)):
                wrong.append((name, target))
            elif name.startswith(plugins_) and not target.startswith((plugins_, models_, pipeline_)):
                wrong.append((name, target))
    assert wrong == []
    heavy = {"nonebot", "torch", "transformers", "peft", "llama_cpp", "accelerate"}
    for name, path in files.items():
        if name.startswith(pipeline_):
            assert not external_imports(path) & (heavy | {"aiohttp", "urllib"}), name  # pure data, no network
        if name.startswith(models_):
            assert "nonebot" not in external_imports(path), name


def test_no_generic_top_level_names_and_every_package_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == PACKAGE_DIRS
    packages = {name for name, path in module_files().items() if path.name == "__init__.py"}
    # the benchmarks run from a checkout only
    assert set(config["packages"]) == {p for p in packages if not p.startswith("corefbot.bench")}
