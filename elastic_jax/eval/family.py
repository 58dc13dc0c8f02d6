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


def family_markdown(results: dict, analysis: dict) -> list[str]:
    """The report's "Tokens to match" section; [] without `analysis["family_tokens"]`."""
    f = analysis.get("family_tokens")
    if not f:
        return []
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
          "360x fewer than training each size from scratch (not measured in this run: no from-scratch "
          "baseline is trained). Baselines run the elastic run's warmup share of their steps.", ""]
    return L
