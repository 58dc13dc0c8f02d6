"""No import cycles among elastic_jax's modules, function-local imports included (a cycle hidden
behind an import inside a function is still a cycle: the two modules cannot be understood, tested
or moved apart). The graph's edges are those of the layer test (`test_package._imports`)."""
import pytest

from test_package import _imports, _modules

# cycles left on this branch, owned elsewhere: kinds/moe.py imports expert_parallel inside
# moe_mixer, which imports moe's routing (helper 32a's kinds/moe package breaks it); train/runctl.py
# imports loop._gather_json inside a function while loop.py imports runctl
KNOWN = {frozenset({"elastic_jax.model.kinds.moe", "elastic_jax.model.expert_parallel"}),
         frozenset({"elastic_jax.train.loop", "elastic_jax.train.runctl"})}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _ in _imports(m, path, is_pkg, modules) if t in modules and t != m}
            for m, (path, is_pkg) in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_but_the_known_one():
    found = set(cycles(import_graph()))
    assert found <= KNOWN, "import cycles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in found - KNOWN)


def test_hf_quant_and_decoder_quant_cycles_are_gone():
    g = import_graph()
    assert "elastic_jax.quant.state" not in g["elastic_jax.model.decoder"]
    assert not any(t.startswith("elastic_jax.hf") for t in g["elastic_jax.quant.state"] | g["elastic_jax.quant"])
    found = cycles(g)
    assert not any(m.startswith(("elastic_jax.hf", "elastic_jax.quant", "elastic_jax.model.decoder"))
                   for c in found for m in c), found


@pytest.mark.xfail(strict=True, reason="the KNOWN cycles (kinds/moe <-> expert_parallel, train loop <-> runctl)")
def test_no_import_cycles_at_all():
    assert not cycles(import_graph())
