"""The package's layers (docs/architecture.md), enforced from the source: every import, at module level or inside
a function, must point down the layers, and no modules may import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "difflineage"

# The layers, bottom first. A module may import its own package (models.dydit -> models.dit) and any lower layer.
LAYERS = [
    {"errors"},
    {"weights", "images", "config", "storage", "machine"},
    {"checkpoint", "nn", "data"},
    {"models", "diffusion"},
    {"interop"},
    {"systems"},
    {"train", "eval"},
    {"convert", "extract", "demo", ""},  # "": the package's own __init__ (difflineage.load)
    {"cli"},
    {"__main__"},
]
# What the layers alone would allow but the contract forbids: the maths never reads a run's config.
FORBIDDEN = {"nn": {"config"}, "models": {"config"}, "diffusion": {"config"}}


def module_names(package: Path) -> dict[str, Path]:
    """Dotted names (relative to the package: ``models.dit``; the package's __init__ is ``""``) -> files."""
    names = {}
    for f in sorted(package.rglob("*.py")):
        parts = f.relative_to(package).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return names


def imports_of(name: str, path: Path, known: dict[str, Path], package: str) -> set[str]:
    """The package's modules that ``name`` imports (each import resolved to the longest known module name)."""
    is_init = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = name.split(".") if name else []
                base = base if is_init else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([package, *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t != package and not t.startswith(package + "."):
                continue
            rel = t[len(package) + 1:] if t != package else ""
            while rel and rel not in known:
                rel = rel.rpartition(".")[0]
            if rel in known and rel != name:
                found.add(rel)
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"module {module!r} belongs to no layer: add its package to LAYERS and docs/architecture.md")


def check(package: Path) -> tuple[list[str], list[list[str]]]:
    """(imports against the layers, cycles) of the package at ``package``."""
    known = module_names(package)
    graph = {m: imports_of(m, f, known, package.name) for m, f in known.items()}
    against = []
    for m, targets in sorted(graph.items()):
        top = m.split(".")[0]
        for t in sorted(targets):
            same_package = t.split(".")[0] == top and m != ""
            if (not same_package and layer_of(t) >= layer_of(m)) or t.split(".")[0] in FORBIDDEN.get(top, ()):
                against.append(f"{package.name}.{m} -> {package.name}.{t}".replace(f"{package.name}. ", ""))
    return against, cycles(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_the_package_keeps_its_layers():
    against, circles = check(PACKAGE)
    assert not circles, f"import cycles: {circles}"
    assert not against, "imports against the layers (docs/architecture.md):\n" + "\n".join(against)


def test_every_module_belongs_to_a_layer_and_imports_are_seen():
    known = module_names(PACKAGE)
    for module in known:
        layer_of(module)
    assert "models.autoencoder_kl" in imports_of("systems.spaces", known["systems.spaces"], known, "difflineage")
    assert "systems.registry" in imports_of("", known[""], known, "difflineage")


def test_the_check_finds_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "fakepkg"
    for name, text in {"__init__.py": "", "errors.py": "", "config.py": "from fakepkg.errors import X\n",
                       "models/__init__.py": "", "models/a.py": "from fakepkg.config import ConfigError\n",
                       "systems/__init__.py": "", "systems/s.py": "def f():\n    from fakepkg.train import t\n",
                       "train/__init__.py": "", "train/t.py": "from fakepkg.systems import s\n",
                       "nn/__init__.py": "", "nn/b.py": "from ..systems.s import f\n"}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    against, circles = check(pkg)
    assert circles == [["systems", "systems.s", "train", "train.t"]] or \
        any(set(c) >= {"systems.s", "train.t"} for c in circles), circles
    assert "fakepkg.models.a -> fakepkg.config" in against  # forbidden although config is lower
    assert "fakepkg.systems.s -> fakepkg.train" in against  # a late import counts too
    assert "fakepkg.nn.b -> fakepkg.systems.s" in against  # relative imports are resolved
    assert not any(a.startswith("fakepkg.config") for a in against)
