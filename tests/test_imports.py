"""The package's import structure: every module imports on its own, and no import cycles.

1. Every module of the package (found with pkgutil, compiled ones and
   subpackages included, plus every Cython .pyx) imports cleanly in a fresh
   interpreter on its own: `python -c "import taskcore.X"`. A module that only
   imports after something else was imported first, or that fails because of a
   cycle, fails here. The interpreters run in parallel, so this takes seconds.
2. The graph of taskcore-internal imports, read from each module's source, has
   no cycles: no two modules import each other, directly or through others.
   Every import statement counts, including the ones inside functions (a lazy
   import is still a dependency; it only hides the cycle until the function
   runs). .py sources are read with `ast`; .pyx/.pxd sources (which `ast`
   cannot parse) with a line regex for `import`/`cimport`.
3. The nanny imports nothing from `taskcore.deploy`: deploy/ starts nannies,
   so the nanny must not depend on it.

How an import becomes an edge of the graph (see `_targets`):
- `import taskcore.a.b` and `from taskcore.a import b` (b a submodule) depend
  on `taskcore.a.b`; relative imports are resolved first.
- `from taskcore.a import name` (name not a submodule) depends on `taskcore.a`,
  except where `taskcore/a/__init__.py` re-exports the name lazily from a
  table (`_LAZY` / `_EXPORTS` in taskcore/__init__.py and deploy/__init__.py,
  read from the source): then it depends on the module the table names,
  followed through further tables (`from taskcore import LocalCluster` ->
  `taskcore.deploy` -> `taskcore.deploy.local`). That is what the import
  actually runs: those __init__s import nothing when they are imported, only
  the one module a name comes from when the name is first used. Counting the
  whole __init__ instead would make `from taskcore import Client` depend on
  every module the package re-exports, and any module using it a false cycle.
- A package __init__ itself depends on what it imports, and on every module its
  lazy table names (its `__getattr__` imports them), so a plain `import taskcore`
  followed by `taskcore.Client` depends on everything `taskcore` re-exports.
- The implicit import of parent packages (`import taskcore.a.b` runs
  taskcore/a/__init__.py first) is not an edge: it is the same for every
  submodule, and a package __init__ that imports its own submodules (as
  transports/__init__.py does) is the normal layout, not a cycle.
- Strings handed to `importlib.import_module` at run time (the transport
  backend registry, spec classes given by dotted name) are plugin lookups
  chosen by data, not imports of this source, and are not edges.
"""
import ast
import concurrent.futures
import functools
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import taskcore

PKG = "taskcore"
PKG_DIR = Path(taskcore.__file__).resolve().parent
SRC_DIR = PKG_DIR.parent


# ---------------------------------------------------------------------------------------------
# The package's modules and their sources
# ---------------------------------------------------------------------------------------------

def _walk(path: Path, prefix: str):
    # iter_modules on the directory itself (no package is imported to find its __path__); it
    # sees .py files, compiled extension modules and subpackages alike.
    for info in pkgutil.iter_modules([str(path)], prefix):
        yield info.name, info.ispkg
        if info.ispkg:
            yield from _walk(path / info.name.rpartition(".")[2], info.name + ".")


def _discover():
    packages = {PKG}
    names = {PKG}
    for name, ispkg in _walk(PKG_DIR, PKG + "."):
        names.add(name)
        if ispkg:
            packages.add(name)
    # A .pyx is a module even where it has not been compiled (yet): it must import too.
    for pyx in PKG_DIR.rglob("*.pyx"):
        rel = pyx.relative_to(SRC_DIR).with_suffix("")
        names.add(".".join(rel.parts))
    return sorted(names), packages


MODULES, PACKAGES = _discover()


def _sources(name):
    """The files a module's imports are read from: its .py, or its .pyx with its .pxd."""
    base = SRC_DIR.joinpath(*name.split("."))
    if name in PACKAGES:
        return [base / "__init__.py"]
    if base.with_suffix(".py").exists():  # also the compiled glue (scheduler.py -> .so)
        return [base.with_suffix(".py")]
    return [p for p in (base.with_suffix(".pyx"), base.with_suffix(".pxd")) if p.exists()]


# ---------------------------------------------------------------------------------------------
# 1. Every module imports on its own
# ---------------------------------------------------------------------------------------------

def _python(code, timeout=120):
    """Run `python -c code` in a fresh interpreter on this checkout's package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SRC_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # From the filesystem root: nothing in the working directory can shadow a module.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.abspath(os.sep))


def _import_alone(name):
    return _python(f"import {name}")


@pytest.fixture(scope="module")
def fresh_imports():
    """`import X` in a fresh interpreter for every module at once, in parallel."""
    workers = min(len(MODULES), max(4, (os.cpu_count() or 4)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(zip(MODULES, pool.map(_import_alone, MODULES)))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_on_its_own(name, fresh_imports):
    proc = fresh_imports[name]
    assert proc.returncode == 0, (
        f"`python -c 'import {name}'` failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------
# 2. The import graph
# ---------------------------------------------------------------------------------------------

def _in_package(name):
    return name == PKG or name.startswith(PKG + ".")


def _resolve_relative(module, level, target):
    """`from .x import y` in `module` -> the absolute name of `.x`."""
    if not level:
        return target
    parts = module.split(".")
    if module not in PACKAGES:
        parts = parts[:-1]  # a module's relative imports start at its package
    if level > 1:
        parts = parts[:-(level - 1)]
    return ".".join(parts + ([target] if target else []))


def _parse_py(path):
    """(module, [names] or None, line, lazy, level) for each import statement in a .py file;
    lazy: inside a function (run when it is called, not when the module is imported)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, None, child.lineno, lazy, 0) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append((child.module or "", [a.name for a in child.names], child.lineno,
                              lazy, child.level))
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                    ast.Lambda)))

    visit(tree, False)
    return found


# `from X cimport/import a, b` (names may be a parenthesized list over several lines) and
# `cimport/import X, Y as Z`; an indented statement is inside a function (or class): lazy.
_FROM_RE = re.compile(r"^([ \t]*)from[ \t]+(\.*)([\w.]*)[ \t]+c?import[ \t]+(\([^)]*\)|[^\n#]*)",
                      re.M)
_IMPORT_RE = re.compile(r"^([ \t]*)c?import[ \t]+([^\n#]*)", re.M)


def _split_names(text):
    names = []
    for part in text.strip().strip("()").replace("\n", " ").split(","):
        part = part.strip()
        if part:
            names.append(part.split()[0])  # drop "as alias"
    return names


def _parse_cython(path):
    """The same tuples as `_parse_py`, for a .pyx/.pxd (by regex: `ast` cannot parse Cython)."""
    text = path.read_text()
    found = []
    for m in _FROM_RE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        found.append((m.group(3), _split_names(m.group(4)), line, bool(m.group(1)),
                      len(m.group(2))))
    for m in _IMPORT_RE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        found.extend((n, None, line, bool(m.group(1)), 0) for n in _split_names(m.group(2)))
    return found


def _imports(name):
    """Every import statement of module `name`: (file, line, lazy, base module, names)."""
    out = []
    for path in _sources(name):
        parse = _parse_py if path.suffix == ".py" else _parse_cython
        for target, names, line, lazy, level in parse(path):
            base = _resolve_relative(name, level, target)
            out.append((path, line, lazy, base, names))
    return out


@functools.lru_cache(maxsize=None)
def _reexport_table(package):
    """A package __init__'s lazy re-exports ({name: module}), read from its source: module-level
    dicts whose keys are names and whose values are all taskcore module names."""
    if package not in PACKAGES:
        return {}
    table = {}
    tree = ast.parse(_sources(package)[0].read_text())
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            keys = [k.value if isinstance(k, ast.Constant) else None for k in node.value.keys]
            values = [v.value if isinstance(v, ast.Constant) else None
                      for v in node.value.values]
            if keys and all(isinstance(k, str) for k in keys) and \
                    all(v in MODULES for v in values):
                table.update(zip(keys, values))
    return table


def _defining_module(module, attr, seen=()):
    """The module `from module import attr` runs, following lazy re-export tables."""
    target = _reexport_table(module).get(attr)
    if target is None or target in seen:
        return module
    return _defining_module(target, attr, seen + (module,))


def _targets(base, names):
    """The taskcore modules an import statement depends on (see the module doc)."""
    if not _in_package(base):
        return []
    if names is None:  # import a.b.c
        return [base]
    out = []
    for attr in names:
        if attr == "*":
            out.append(base)
        elif attr in _reexport_table(base):
            out.append(_defining_module(base, attr))
        elif f"{base}.{attr}" in MODULES:
            out.append(f"{base}.{attr}")
        else:
            out.append(base)
    return out


def import_graph():
    """{module: {imported module: [(file, line, lazy), ...]}} over the whole package."""
    graph = {}
    for name in MODULES:
        edges = graph.setdefault(name, {})
        for path, line, lazy, base, names in _imports(name):
            for target in _targets(base, names):
                site = (path, line, lazy)
                if target != name and site not in edges.get(target, ()):
                    edges.setdefault(target, []).append(site)
        for target in set(_reexport_table(name).values()):  # what its __getattr__ imports
            if target != name:
                path = _sources(name)[0]
                edges.setdefault(target, []).append((path, 0, True))
    return graph


def _strongly_connected(graph):
    """Tarjan's algorithm: the components with more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle_through(graph, start, allowed):
    """The shortest chain start -> ... -> start inside `allowed` (breadth first)."""
    prev = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in allowed:
                    continue
                if w == start:
                    chain = [v]
                    while prev[chain[-1]] is not None:
                        chain.append(prev[chain[-1]])
                    return list(reversed(chain)) + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return None


def import_cycles(graph):
    """Each cycle as its chain of modules [a, b, ..., a]: for every module on a cycle, the
    shortest cycle through it (duplicates removed), grouped by strongly connected component."""
    cycles = []
    for comp in _strongly_connected(graph):
        allowed = set(comp)
        seen = set()
        for start in comp:
            chain = _shortest_cycle_through(graph, start, allowed)  # never None in a component
            key = frozenset(zip(chain, chain[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(chain)
    return cycles


def _describe_edge(graph, a, b):
    where = []
    for path, line, lazy in graph[a][b][:3]:
        rel = path.relative_to(SRC_DIR)
        where.append(f"{rel}:{line}" + (" (in a function)" if lazy and line else "")
                     if line else f"{rel} (lazy re-export table)")
    return f"{a} -> {b}   [{'; '.join(where)}]"


def format_cycles(graph, cycles):
    lines = []
    for chain in cycles:
        lines.append("  " + " -> ".join(chain))
        lines.extend("      " + _describe_edge(graph, a, b) for a, b in zip(chain, chain[1:]))
    return "\n".join(lines)


def test_import_graph_sees_the_package(tmp_path):
    """Guard for the cycle test: the parsing finds what we know is there."""
    graph = import_graph()
    assert "taskcore.deploy.spec" in graph["taskcore.deploy.local"]
    assert "taskcore.nanny" in graph["taskcore.deploy.local"]  # a lazy import, counted
    assert "taskcore.deploy.local" in graph["taskcore.demo"]  # `from taskcore import LocalCluster`
    assert "taskcore" not in graph["taskcore.demo"]
    assert any(graph[m] for m in MODULES if _sources(m) and _sources(m)[0].suffix == ".pyx")

    pyx = tmp_path / "m.pyx"
    pyx.write_text("cimport cython\n"
                   "from taskcore.core.wire cimport (FrameDecoder,\n    Limits)\n"
                   "from .serialize cimport Serialized  # relative\n"
                   "import taskcore.errors as e, os\n"
                   "def f():\n    from taskcore.client import default_client\n")
    found = {(t, lvl, lazy) for t, _, _, lazy, lvl in _parse_cython(pyx)}
    assert found == {("cython", 0, False), ("taskcore.core.wire", 0, False),
                     ("serialize", 1, False), ("taskcore.errors", 0, False), ("os", 0, False),
                     ("taskcore.client", 0, True)}
    assert _resolve_relative("taskcore.core.protocol", 1, "serialize") == "taskcore.core.serialize"
    assert _resolve_relative("taskcore.deploy", 2, "utils") == "taskcore.utils"
    assert _strongly_connected({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {}}) == \
        [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    cycles = import_cycles(graph)
    assert not cycles, (
        f"{len(cycles)} import cycle(s) between taskcore modules (imports inside functions "
        f"count too):\n{format_cycles(graph, cycles)}")


# ---------------------------------------------------------------------------------------------
# 3. The nanny does not depend on deploy/
# ---------------------------------------------------------------------------------------------

def _is_deploy(name):
    return name == "taskcore.deploy" or name.startswith("taskcore.deploy.")


def test_nanny_imports_nothing_from_deploy():
    graph = import_graph()
    nanny = "taskcore.nanny"
    direct = sorted(m for m in graph[nanny] if _is_deploy(m))
    assert not direct, "taskcore.nanny imports from taskcore.deploy:\n" + "\n".join(
        "  " + _describe_edge(graph, nanny, m) for m in direct)
    # ... nor through the modules it imports (lazy imports included): the chain to deploy/.
    prev = {nanny: None}
    frontier = [nanny]
    while frontier:  # breadth first: the shortest chain to each module
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    reached = sorted(m for m in prev if _is_deploy(m))
    chains = []
    for m in reached:
        chain = [m]
        while prev[chain[-1]] is not None:
            chain.append(prev[chain[-1]])
        chains.append(" -> ".join(reversed(chain)))
    assert not reached, "taskcore.nanny depends on deploy/ through:\n  " + "\n  ".join(chains)
    # And at run time: importing the nanny loads nothing of deploy/.
    proc = _python("import sys, taskcore.nanny; "
                   "print(' '.join(m for m in sys.modules if m.startswith('taskcore.deploy')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [], f"importing taskcore.nanny imported {proc.stdout}"
