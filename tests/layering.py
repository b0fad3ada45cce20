"""Import-graph analysis of a package, from its source alone (``ast``, nothing is imported).

Run ``python -m tests.layering src/polymod`` for the figures (cycles, upward imports,
function-level imports, parameters typed ``Any``, long files); ``tests/test_layering.py``
fails on the first three.

The rules (DESIGN.md, "Layout"): imports point one way. The *core* is everything except
the outer layers below; the core never imports an outer layer. No two files import each
other, directly or through others (a cycle means a concept lives in the wrong file). An
import inside a function is allowed only for an optional dependency, named in
:data:`OPTIONAL` with the reason; everything else is imported at the top of the file.
Imports under ``if TYPE_CHECKING:`` do not run and are not edges of the graph.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The outer layers, relative to the package root: the core never imports them.
OUTER = ("hub/", "training/", "interop/", "serving/", "swarm/", "cli.py")
# Also outside the core (they may import anything), but nothing imports them from the core either.
TOP = ("__init__.py", "demo.py", "assets.py")

# Third-party packages that polymod does not install by default; importing them at the top of a
# file would break ``import polymod`` for users without them, so they are imported where used.
OPTIONAL: dict[str, str] = {
    "peft": "the dev extra only: PEFT parity checks and `write_peft`'s optional round-trip",
    "adapters": "AdapterHub `adapters` is never a dependency; only read when a user has it",
    "matplotlib": "the dev extra only: plots of the demo and the experiments",
    "hivemind": "swarm extra only: remote modules over a DHT",
    "vllm": "serving extra only: the vLLM engine needs a GPU build",
    "psycopg": "pg extra only: the hub's PostgreSQL metadata backend (polymod.hub.pg)",
    "psycopg2": "hub extra only: PostgreSQL metadata store",
    "playwright": "the dev extra only: browser tests of the hub's web pages",
    "datasets": "never a dependency: reading a user's Hugging Face dataset when they pass one",
    "sentence_transformers": "never a dependency: embeddings for retrieval routing when installed",
    "ray": "serving extra only: Ray Serve deployments",
    "pysword": "assets extra only: reading the SWORD Bible modules (polymod.assets_bible)",
    "openai": "the dev extra only: the tour's serving step queries the server with the SDK",
}

# Required dependencies that are still imported where used, each for a measured reason.
SLOW: dict[str, str] = {
    "cma": "only LoraHub's search uses it and `import cma` takes 3.4 s (python -X importtime, after torch "
           "and transformers): at the top of merging/lorahub.py it would triple `import polymod`",
}


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``source`` file imports ``target`` (a dotted name)."""

    source: str  # module name, e.g. polymod.modular
    target: str  # resolved dotted name: a package module, or an external top-level name
    line: int
    in_function: bool
    internal: bool  # target is inside the analysed package


@dataclass
class Report:
    """The figures of one analysis (see :func:`analyse`)."""

    files: dict[str, Path] = field(default_factory=dict)  # module name -> path
    lines: dict[str, int] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    cycles: list[list[str]] = field(default_factory=list)  # strongly connected components, > 1 file
    upward: list[Import] = field(default_factory=list)
    function_optional: list[Import] = field(default_factory=list)
    function_other: list[Import] = field(default_factory=list)
    any_params: list[tuple[str, int, str]] = field(default_factory=list)  # (module, line, "func(arg)")
    long_files: list[tuple[str, int]] = field(default_factory=list)

    @property
    def files_in_cycles(self) -> int:
        """How many files belong to some cycle."""
        return sum(len(c) for c in self.cycles)


def _module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(modules: set[str], name: str) -> str:
    """The longest prefix of ``name`` that is a module of the package (``name`` itself if none)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return name


def _enclosing(target: str, importer: str, modules: set[str]) -> list[str]:
    """The packages around ``target`` that importing it initialises, as seen from ``importer``."""
    parts = target.split(".")
    out = []
    for n in range(1, len(parts)):
        package = ".".join(parts[:n])
        if package in modules and not (importer == package or importer.startswith(package + ".")):
            out.append(package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Visitor(ast.NodeVisitor):
    """Collects import statements (with their depth) and ``Any``-typed parameters of one file."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self.any_params: list[tuple[int, str]] = []
        self._depth = 0

    def visit_If(self, node: ast.If) -> None:  # noqa: N802 - ast's naming
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return  # the body never runs
        self.generic_visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        a = node.args
        # ``*args: Any`` / ``**kwargs: Any`` forward whatever the caller passes; they are not counted
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
            ann = arg.annotation
            if ann is None:
                continue
            if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
                text = ann.value.strip()
            else:
                text = ast.unparse(ann)
            if text in ("Any", "typing.Any"):
                self.any_params.append((node.lineno, f"{node.name}({arg.arg})"))
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = _function  # noqa: N815
    visit_AsyncFunctionDef = _function  # noqa: N815

    def visit_Lambda(self, node: ast.Lambda) -> None:  # noqa: N802
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        self.found.append((node, self._depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        self.found.append((node, self._depth > 0))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [_resolve(modules, alias.name) for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        out.append(full if full in modules else _resolve(modules, base))
    return out


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one node (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        out.append(sorted(component))
    return sorted(out, key=lambda c: (-len(c), c))


def _layer(root: str, module: str) -> str:
    """``core``, ``outer`` or ``top`` for a module name of the package ``root``."""
    rel = module[len(root):].lstrip(".").replace(".", "/")
    is_pkg_init = rel == ""
    if is_pkg_init:
        return "top"
    for prefix in OUTER:
        if prefix.endswith("/") and (rel + "/").startswith(prefix):
            return "outer"
        if rel + ".py" == prefix:
            return "outer"
    if rel + ".py" in TOP:
        return "top"
    return "core"


def analyse(root: Path | str, long_file: int = 400) -> Report:
    """Analyse the package at ``root`` (a directory with ``__init__.py``).

    Args:
        root: the package directory, e.g. ``src/polymod``.
        long_file: files with more lines than this are listed in ``long_files``.

    Returns:
        a :class:`Report`: the import edges and the figures derived from them.
    """
    root = Path(root)
    report = Report()
    paths = sorted(root.rglob("*.py"))
    for path in paths:
        report.files[_module_name(root, path)] = path
    modules = set(report.files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in report.files.items():
        text = path.read_text()
        report.lines[module] = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        visitor = _Visitor()
        visitor.visit(ast.parse(text, filename=str(path)))
        report.any_params += [(module, line, what) for line, what in visitor.any_params]
        for node, in_function in visitor.found:
            # one edge per statement and target (``from a import b, c`` is one import of ``a``)
            for target in dict.fromkeys(_targets(node, module, path.name == "__init__.py", modules)):
                internal = target == root.name or target.startswith(root.name + ".")
                edge = Import(module, target, node.lineno, in_function, internal)
                report.imports.append(edge)
                if internal and target in modules and target != module:
                    graph[module].add(target)
                    # importing a.b.c first runs the packages a.b (and a) it sits in, unless the importer is
                    # inside them already (they are initialising): an import of routing.base from modules/
                    # runs routing/__init__.py and everything it imports
                    for package in _enclosing(target, module, modules):
                        graph[module].add(package)
                if in_function:
                    top = target.split(".")[0]
                    (report.function_optional if not internal and (top in OPTIONAL or top in SLOW)
                     else report.function_other).append(edge)
                if internal and _layer(root.name, module) == "core" and _layer(root.name, target) == "outer":
                    report.upward.append(edge)
    report.cycles = _strongly_connected(graph)
    report.long_files = sorted(((m, n) for m, n in report.lines.items() if n > long_file), key=lambda x: -x[1])
    return report


def _where(edge: Import) -> str:
    return f"{edge.source}:{edge.line} -> {edge.target}"


def summary(report: Report) -> str:
    """The figures as text, one item a line."""
    out = [f"files: {len(report.files)}, lines: {sum(report.lines.values())}"]
    covered = sum(report.lines[m] for c in report.cycles for m in c)
    out.append(f"cycles: {len(report.cycles)} covering {report.files_in_cycles} files ({covered} lines)")
    out += [f"  {' <-> '.join(c)}" for c in report.cycles]
    out.append(f"upward imports (core -> outer layers): {len(report.upward)}")
    out += [f"  {_where(e)}" for e in report.upward]
    out.append(f"function-level imports: {len(report.function_optional) + len(report.function_other)} "
               f"({len(report.function_optional)} optional, {len(report.function_other)} not)")
    out += [f"  {_where(e)}" for e in report.function_other]
    out.append(f"parameters typed Any: {len(report.any_params)}")
    out += [f"  {m}:{line} {what}" for m, line, what in report.any_params]
    out.append(f"files > 400 lines: {len(report.long_files)}")
    out += [f"  {m}: {n}" for m, n in report.long_files]
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(analyse(sys.argv[1] if len(sys.argv) > 1 else "src/polymod")))
