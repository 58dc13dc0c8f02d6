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


def family_tokens(results: dict, analysis: dict) -> dict | None:
    """{"elastic", "sizes": [{name, seen, multiple, tokens: [lo, hi]}], "separate": [lo, hi],
    "separate_with_search": [lo, hi], "ratio": [lo, hi], "ratio_with_search": [lo, hi]} (token counts;
    ratios separate / elastic), or None without an elastic run and a token sweep."""
    elastic = (results.get("training") or {}).get("elastic_tokens")
    eff = analysis.get("token_efficiency") or {}
    seen = results.get("nested_tokens") or {}
    if not elastic or not eff:
        return None
    sizes, lo, hi = [], 0.0, 0.0
    for name, e in eff.items():
        b = _bound(e.get("multiple"), seen.get(name, 0.0))
        if b is None:
            return None
        sizes.append({"name": name, "seen": seen.get(name, 0.0), "multiple": e.get("multiple"), "tokens": list(b)})
        lo, hi = lo + b[0], hi + b[1]
    return {"elastic": int(elastic), "sizes": sizes, "separate": [lo, hi],
            "separate_with_search": [lo + elastic, hi + elastic],
            "ratio": [lo / elastic, hi / elastic], "ratio_with_search": [(lo + elastic) / elastic, (hi + elastic) / elastic],
            "parent": int((results.get("training") or {}).get("parent_tokens") or 0)}


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
        tr = results.get("training") or {}
        fam = (tr.get("parent_tokens") or 0) + (tr.get("elastic_tokens") or 0)
        L += ["### From scratch: each smaller size trained alone from random init (next-token CE)", "",
              "| size | steps | tokens | accuracy [95% CI] | nested accuracy |", "|---|---|---|---|---|"]
        for r in scratch:
            nr = nested.get(r["name"], {})
            L.append(f"| {r['name']} | {r['steps']} | {r['train_tokens']:,} | {r['accuracy']:.3f} {ci(r)} | "
                     f"{nr.get('accuracy', float('nan')):.3f} |")
        L += ["", f"The elastic family cost {fam:,} tokens (parent + elastic run) for every size; training each "
                  f"smaller size from scratch cost {sum(r['train_tokens'] for r in scratch):,} tokens for these "
                  "accuracies (the paper's 360x claim, in miniature).", ""]
    return L


def family_markdown(results: dict, analysis: dict) -> list[str]:
    """The report's "Tokens to match" section (with the LR sweep and from-scratch baselines when run);
    [] without any of them."""
    f = analysis.get("family_tokens")
    if not f:
        extra = extra_baselines_markdown(results)
        return (["## Tokens to match: the whole family", ""] + extra) if extra else []
    tok = lambda v: f"{v:,.0f}"
    x = lambda v: f"{v:.2f}x"
    L = ["## Tokens to match: the whole family", "",
         "One elastic run yields every nested size; the separate route distills each size alone. A size's "
         "tokens to match = its tokens-to-match multiple (token sweep above, seed 0) x the tokens that nested "
         "model saw in the elastic run (its expected sampling share; the shared prefix weights are updated on "
         "every elastic step, so the per-size '1x' understates what it got). The full-size member is the parent "
         "on both routes, and the parent's own training is shared and not counted.", "",
         "| size | tokens it saw in the elastic run | multiple to match | separate tokens to match |",
         "|---|---|---|---|"]
    for s in f["sizes"]:
        m = s["multiple"]
        L.append(f"| {s['name']} | {tok(s['seen'])} | {m if isinstance(m, str) else x(m)} | "
                 f"{_rng(s['tokens'], tok)} |")
    L += ["", "| route | tokens | / elastic run |", "|---|---|---|",
          f"| Star Elastic: one run, every size | {tok(f['elastic'])} | 1.00x |",
          f"| every size distilled separately, at matched accuracy | {_rng(f['separate'], tok)} | "
          f"{_rng(f['ratio'], x)} |",
          f"| the same, charged for its width search (the elastic run that found the widths) | "
          f"{_rng(f['separate_with_search'], tok)} | {_rng(f['ratio_with_search'], x)} |", "",
          "The paper's claims in miniature: 7x fewer tokens than sequential compression (the charged row) and "
          "360x fewer than training each size from scratch" + ("" if results.get("scratch") else
                                                                 " (not measured in this run: `scratch_steps=0`)")
          + ". Baselines run the elastic run's warmup share of their steps.", ""]
    return L + extra_baselines_markdown(results)
