"""Package-level contracts: importing elastic_jax runs no JAX computation (multi-host jobs must be
able to call jax.distributed.initialize after `import elastic_jax`), and no module imports from a
layer of the code above its own."""
import ast
import os
import socket
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_leaves_distributed_initialize_possible():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import elastic_jax, jax; "
            f"jax.distributed.initialize(coordinator_address='127.0.0.1:{port}', num_processes=1, process_id=0); "
            "print(jax.process_count())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("1")


# --------------------------------------------------------------------------------- import layers
# The layering of the code (README "Architecture"): a module imports only from its own layer or
# the layers below it. Modules are matched by the longest prefix listed.
LAYERS = {
    "elastic_jax.kernels": 1, "elastic_jax._version": 1,
    "elastic_jax.config": 2, "elastic_jax.config_base": 2, "elastic_jax.registry": 2, "elastic_jax.widths": 2, "elastic_jax.sharding": 2, "elastic_jax.errors": 2,
    "elastic_jax.fileio": 2, "elastic_jax.finite": 2, "elastic_jax.hostmem": 2, "elastic_jax.aot": 2, "elastic_jax.quant.formats": 2, "elastic_jax.quant.qweight": 2,
    "elastic_jax.model": 3, "elastic_jax.quant": 3, "elastic_jax.nnx": 3,
    "elastic_jax.elastic": 4,
    "elastic_jax.hf": 5,
    "elastic_jax.data": 6, "elastic_jax.tasks": 6, "elastic_jax.train": 6,
    "elastic_jax.infer": 7, "elastic_jax.eval": 7, "elastic_jax.data.tokenize": 7,
    "elastic_jax.cli": 8, "elastic_jax.experiment": 8, "elastic_jax.recipes": 8,
    "elastic_jax": 8,   # the package facade re-exports the public API
}
PACKAGE_DIRS = {"elastic_jax": os.path.join(ROOT, "elastic_jax")}


def _layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer of LAYERS: add it")


def _modules() -> dict[str, tuple[str, bool]]:
    """{dotted module name: (file, is_package)} of the installed package's source."""
    out = {}
    for pkg, root in PACKAGE_DIRS.items():
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d != "__pycache__" and os.path.join(folder, d) not in
                          PACKAGE_DIRS.values()]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".")
                    rel = "" if rel == "__init__" else rel.removesuffix(".__init__")
                    out[pkg + ("." + rel if rel else "")] = (os.path.join(folder, f), f == "__init__.py")
    return out


def _imports(module: str, path: str, is_package: bool, modules) -> list[tuple[str, int]]:
    """(imported elastic_jax module, line) for every import in the file, function-local ones too."""
    base = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "elastic_jax"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")[:len(base.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "elastic_jax":
                continue
            for a in node.names:   # `from pkg import submodule` depends on the submodule only
                sub = f"{target}.{a.name}"
                found.append((sub if sub in modules else target, node.lineno))
    return found


def test_no_module_imports_from_a_layer_above_it():
    modules = _modules()
    assert "elastic_jax.model.decoder" in modules and "elastic_jax.kernels.reference" in modules
    upward = set()
    for module, (path, is_package) in sorted(modules.items()):
        for target, line in _imports(module, path, is_package, modules):
            if _layer(target) > _layer(module):
                upward.add(f"{os.path.relpath(path, ROOT)}:{line} {module} (layer {_layer(module)}) imports "
                              f"{target} (layer {_layer(target)})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def _import_cycles(modules) -> list[list[str]]:
    """The import cycles (of any length) among the package's modules: the strongly connected
    components of more than one module of the import graph (function-local imports included)."""
    graph = {m: sorted({t for t, _ in _imports(m, path, pkg, modules) if t in modules and t != m})
             for m, (path, pkg) in modules.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):                       # Tarjan, iterative (no recursion limit on deep chains)
        work = [(v, iter(graph[v]))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        cycles.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_import_cycle_finder_sees_a_three_module_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "elastic_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")      # a function-local import counts
    (pkg / "c.py").write_text("from elastic_jax.a import x\n")
    (pkg / "d.py").write_text("from . import a\n")                       # imports into the cycle, not part of it
    monkeypatch.setitem(PACKAGE_DIRS, "elastic_jax", str(pkg))
    assert _import_cycles(_modules()) == [["elastic_jax.a", "elastic_jax.b", "elastic_jax.c"]]


def test_no_import_cycle():
    cycles = _import_cycles(_modules())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# ------------------------------------------------------------------------------------ dependencies
IMPORT_NAME = {"orbax-checkpoint": "orbax", "absl-py": "absl", "pytest-xdist": "xdist", "jax[tpu]": "libtpu"}
NOT_IMPORTED = {"pytest-xdist": "a pytest plugin (-n 2)", "ipykernel": "the notebook test's kernel"}


def _imported_top_names(*folders) -> set[str]:
    names = set()
    for folder in folders:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    for node in ast.walk(ast.parse(open(os.path.join(dirpath, f)).read())):
                        if isinstance(node, ast.Import):
                            names |= {a.name.split(".")[0] for a in node.names}
                        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                            names.add(node.module.split(".")[0])
                        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip"
                              and node.args and isinstance(node.args[0], ast.Constant)):
                            names.add(str(node.args[0].value).split(".")[0])
    return names


def test_every_declared_dependency_is_imported():
    import re
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    used = _imported_top_names("elastic_jax", "kernels", "tests", "experiments")
    unused = []
    for req in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        dist = re.split(r"[<>=!~ ]", req, maxsplit=1)[0]
        if dist not in NOT_IMPORTED and IMPORT_NAME.get(dist, dist) not in used:
            unused.append(req)
    assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"


# -------------------------------------------------------------------------- citations in the code
def test_code_cites_only_documents_in_the_repository():
    """The method's sections are cited as `METHOD §n` (docs/METHOD.md), not as sections of
    reference documents that are not in the repository."""
    import re
    bad = re.compile(r"\b[Ss]pec §|ANCHORS|JAX_NOTES|STAR_ELASTIC_SPEC")
    assert os.path.isfile(os.path.join(ROOT, "docs", "METHOD.md"))
    found = []
    for folder in ("elastic_jax", "kernels", "experiments", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)
                if f.endswith(".py") and rel != "tests/test_package.py":
                    found += [f"{rel}:{i}" for i, line in enumerate(open(path), 1) if bad.search(line)]
    assert not found, f"citations of documents outside the repository: {found}"
