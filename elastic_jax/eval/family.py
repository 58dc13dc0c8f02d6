"""Tokens to match, counted for the whole family (issue 30; the paper's token claims, METHOD §11.2).

One elastic run trains every nested size at once; the separate route distills each size alone. The
per-size "1x" of the token sweep is a nested model's expected sampling share of the elastic run, while
the shared prefix weights are updated on every step, so the family-level comparison is: the elastic
run's tokens against the sum over sizes of the tokens a separately distilled baseline needs to match
that size's nested model (the sweep's tokens-to-match multiple x the tokens that size saw). The separate
route's baselines start from the router's widths; charged for that width search, it also pays for the
elastic run that found them.
"""
from __future__ import annotations


def _bound(m, seen: float):
    """(low, high) tokens a baseline needs, from a tokens-to-match multiple or its bound string."""
    if isinstance(m, (int, float)):
        return m * seen, m * seen
    if isinstance(m, str) and m.startswith("<= "):
        return 0.0, float(m[3:]) * seen
    if isinstance(m, str) and m.startswith("> "):
        return float(m[2:]) * seen, float("inf")
    return None


def _route(table: dict, seen: dict):
    """(per-size rows {name, seen, multiple, tokens: [lo, hi]}, total [lo, hi]) from a tokens-to-match
    table {name: {"multiple": ...}}; None when it is empty or a size has no multiple."""
    sizes, lo, hi = [], 0.0, 0.0
    for name, e in table.items():
        b = _bound(e.get("multiple"), seen.get(name, 0.0))
        if b is None:
            return None
        sizes.append({"name": name, "seen": seen.get(name, 0.0), "multiple": e.get("multiple"), "tokens": list(b)})
        lo, hi = lo + b[0], hi + b[1]
    return (sizes, [lo, hi]) if sizes else None


def family_tokens(results: dict, analysis: dict) -> dict | None:
    """Token counts of the family's routes, ratios over the elastic run's tokens: {"elastic", "parent";
    with a token sweep: "sizes": [{name, seen, multiple, tokens: [lo, hi]}], "separate": [lo, hi],
    "separate_with_search", "ratio", "ratio_with_search"; with from-scratch snapshots: "scratch_sizes",
    "scratch", "scratch_ratio"}, or None without an elastic run and either of them."""
    elastic = (results.get("training") or {}).get("elastic_tokens")
    seen = results.get("nested_tokens") or {}
    if not elastic:
        return None
    out = {"elastic": int(elastic), "parent": int((results.get("training") or {}).get("parent_tokens") or 0)}
    distilled = _route(analysis.get("token_efficiency") or {}, seen)
    if distilled:
        (sizes, (lo, hi)) = distilled
        out.update(sizes=sizes, separate=[lo, hi], separate_with_search=[lo + elastic, hi + elastic],
                   ratio=[lo / elastic, hi / elastic], ratio_with_search=[(lo + elastic) / elastic, (hi + elastic) / elastic])
    scratch = _route(analysis.get("scratch_to_match") or {}, seen)
    if scratch:
        (sizes, (lo, hi)) = scratch
        out.update(scratch_sizes=sizes, scratch=[lo, hi], scratch_ratio=[lo / elastic, hi / elastic])
    return out if distilled or scratch else None


def _rng(v, fmt) -> str:
    lo, hi = v
    if lo == hi:
        return fmt(lo)
    return f"{fmt(lo)} - {'unbounded' if hi == float('inf') else fmt(hi)}"


def extra_baselines_markdown(results: dict) -> list[str]:
    """The LR sweep of the 1x baselines and the from-scratch baselines (seed 0), when the run has them."""
    from .stats import bootstrap_ci
    lrs, scratch = results.get("lr_sweep") or [], results.get("scratch") or []
    if not lrs and not scratch:
        return []
    ci = lambda r: "" if not r.get("scores") else "[{:.3f}, {:.3f}]".format(*bootstrap_ci(r["scores"], n_boot=1000))
    nested = {r["name"]: r for r in results.get("nested", [])}
    L = []
    if lrs:
        one_x = {r["name"]: r for r in results.get("token_sweep", []) if r.get("multiple") in (1.0, None)}
        base_lr = ((results.get("config") or {}).get("baseline_train") or {}).get("optim", {}).get("lr")
        L += ["### The 1x baselines' learning rate", "",
              "| size | learning rate | baseline accuracy [95% CI] | tokens |", "|---|---|---|---|"]
        for n in dict.fromkeys(r["name"] for r in lrs):
            rows = ([dict(one_x[n], lr=base_lr)] if n in one_x else []) + [r for r in lrs if r["name"] == n]
            for r in sorted(rows, key=lambda r: r.get("lr") or 0.0):
                L.append(f"| {n} | {r.get('lr') if r.get('lr') is not None else 'default'} | {r['accuracy']:.3f} "
                         f"{ci(r)} | {r['train_tokens']:,} |")
        L += ["", "The separate route's learning-rate search costs these tokens too.", ""]
    if scratch:
        L += ["### From scratch: each smaller size trained alone from random init (next-token CE)", "",
              "The parent's schedule (learning rate, warmup share) over the steps below, evaluated at every quarter "
              "of its run; 'multiple' = the snapshot's tokens over the tokens that size saw in the elastic run.", "",
              "| size | steps | tokens | multiple | accuracy [95% CI] | nested accuracy |", "|---|---|---|---|---|---|"]
        for r in scratch:
            nr = nested.get(r["name"], {})
            mult = f"{r['multiple']:.1f}x" if r.get("multiple") is not None else ""
            L.append(f"| {r['name']} | {r['steps']} | {r['train_tokens']:,} | {mult} | {r['accuracy']:.3f} {ci(r)} | "
                     f"{nr.get('accuracy', float('nan')):.3f} |")
        L.append("")
    return L


def family_markdown(results: dict, analysis: dict) -> list[str]:
    """The report's "Tokens to match" section (with the LR sweep and from-scratch baselines when run);
    [] without any of them."""
    f = analysis.get("family_tokens") or {}
    extra = extra_baselines_markdown(results)
    if not f:
        return (["## Tokens to match: the whole family", ""] + extra) if extra else []
    tok = lambda v: f"{v:,.0f}"
    x = lambda v: f"{v:.2f}x"
    mult = lambda m: (f"{m.split()[0]} {x(float(m.split()[1]))}" if isinstance(m, str) else x(m))   # "> 3.78061"
    L = ["## Tokens to match: the whole family", "",
         "One elastic run yields every nested size; the separate route distills each size alone, the from-scratch "
         "route trains each size from random init. A size's tokens to match = its tokens-to-match multiple (the "
         "token sweep above, or the from-scratch snapshots below; seed 0) x the tokens that nested model saw in the "
         "elastic run (its expected sampling share; the shared prefix weights are updated on every elastic step, so "
         "the per-size '1x' understates what it got). The full-size member is the parent on every route, and the "
         "parent's own training is shared and not counted.", "",
         "| size | tokens it saw in the elastic run | route | multiple to match | tokens to match |",
         "|---|---|---|---|---|"]
    for key, route in (("sizes", "distilled separately"), ("scratch_sizes", "from scratch")):
        for s in f.get(key) or []:
            L.append(f"| {s['name']} | {tok(s['seen'])} | {route} | {mult(s['multiple'])} | {_rng(s['tokens'], tok)} |")
    L += ["", "| route | tokens | / elastic run |", "|---|---|---|",
          f"| Star Elastic: one run, every size | {tok(f['elastic'])} | 1.00x |"]
    if f.get("separate"):
        L += [f"| every size distilled separately, at matched accuracy | {_rng(f['separate'], tok)} | "
              f"{_rng(f['ratio'], x)} |",
              f"| the same, charged for its width search (the elastic run that found the widths) | "
              f"{_rng(f['separate_with_search'], tok)} | {_rng(f['ratio_with_search'], x)} |"]
    if f.get("scratch"):
        L.append(f"| every size trained from scratch, at matched accuracy | {_rng(f['scratch'], tok)} | "
                 f"{_rng(f['scratch_ratio'], x)} |")
    L += ["", "The paper's claims in miniature: 7x fewer tokens than sequential compression (the charged row) and "
              "360x fewer than training each size from scratch" + ("" if f.get("scratch") else
                                                                     " (not measured in this run: `scratch_steps=0`)")
          + ". Baselines run the elastic run's warmup share of their steps; 'unbounded': no measured point matched "
            "(the route needs more than its largest).", ""]
    return L + extra
