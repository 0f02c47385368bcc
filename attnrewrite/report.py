"""The report (JSON schema 1, described in docs/design.md) and its terminal table."""
from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, version

import torch
from rich.console import Console
from rich.table import Table

from ._lazy import pyplot as plt  # matplotlib (Agg backend), imported when a plot is drawn

SCHEMA = 1


def tool_versions() -> dict:
    out = {"attnrewrite": _version(), "torch": torch.__version__}
    for mod in ("onnx", "onnxruntime"):      # read from the installed metadata: importing onnxruntime writes files
        try:
            out[mod] = version(mod)
        except PackageNotFoundError:
            out[mod] = None
    return out


def _version() -> str:
    try:
        return version("attnrewrite")
    except PackageNotFoundError:           # running from a checkout
        return "0+local"


def _clean(x):
    """JSON-safe: NaN/inf as strings, symbolic values as their names."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def build_report(*, model, fmt, variant, options, inputs_kind, sites, check=None, timings=None,
                 output=None, cost=None, kernels=None) -> dict:
    """The report; `cost` ({"sites": {id: {"before", "after"}}, "total": {"before", "after"}}) adds
    each site's and the model's cost block; `kernels` ({id: {"kernel", "kernel_reason", "impl",
    "impl_reason"}}) each site's generated kernel (or null and why none runs) and the
    implementation its op takes on this machine (and why no faster one)."""
    rep = {"schema": SCHEMA, "tool": tool_versions(), "model": model, "format": fmt,
           "variant": variant, "options": options, "output": output, "inputs": inputs_kind,
           "sites": [s.to_dict() for s in sites]}
    if kernels is not None:
        for site in rep["sites"]:
            site.update(kernels.get(site["id"], {"kernel": None, "kernel_reason": "the site is not rewritten"}))
    if cost is not None:
        for site in rep["sites"]:
            if site["id"] in cost["sites"]:
                site["cost"] = cost["sites"][site["id"]]
        rep["cost"] = cost["total"]
    if check is not None:
        rep["check"] = check
    rep["timings"] = {k: round(v, 4) for k, v in (timings or {}).items()}
    return _clean(rep)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def _cost_cells(cost: dict | None, rewriting: bool) -> list[str]:
    if not cost:
        return ["-", "-"]
    before, after = cost["before"], cost["after"]
    if not rewriting:
        return [f"{before['flops'] / 1e9:.3g}", str(before["depth"])]
    return [f"{before['flops'] / 1e9:.3g}→{after['flops'] / 1e9:.3g}", f"{before['depth']}→{after['depth']}"]


def _brief(d: dict, sep: str) -> str:
    """Scalar entries as `key=value` (options) or `key value` (diagnostics); lists shortened."""
    parts = []
    for k, v in d.items():
        if isinstance(v, (list, tuple)):
            v = "[" + ", ".join(_fmt(x) for x in v[:4]) + (", …]" if len(v) > 4 else "]")
        elif isinstance(v, dict):
            continue
        parts.append(f"{k}{sep}{_fmt(v) if not isinstance(v, str) else v}")
    return ", ".join(parts)


def render_table(report: dict, console=None) -> None:
    console = console or Console()
    checked = "check" in report
    t = Table(title=f"attention sites: {report.get('model') or 'model'}"
              + (f" → {report['variant']}" if report.get("variant") else ""))
    for col in ("id", "name", "source", "B", "H", "Hkv", "Lq", "Lk", "D", "dtype", "scale",
                "mask", "causal", "status"):
        t.add_column(col, overflow="fold")
    costed = "cost" in report
    if costed:
        t.add_column("GFLOP" + (" before→after" if report.get("variant") else ""))
        t.add_column("depth")
    implemented = any("impl" in s for s in report["sites"])
    if implemented:
        t.add_column("impl")
    if checked:
        t.add_column("site rel_err")
        t.add_column("cosine")
    for s in report["sites"]:
        row = [str(s["id"]), s["name"], s["source"], _fmt(s["batch"]), _fmt(s["heads"]), _fmt(s["kv_heads"]),
               _fmt(s["q_len"]), _fmt(s["kv_len"]), _fmt(s["head_dim"]), s["dtype"], _fmt(s["scale"]),
               s["mask"], "yes" if s["causal"] else "no", s["status"]]
        if costed:
            row += _cost_cells(s.get("cost"), bool(report.get("variant")))
        if implemented:
            row.append(s.get("impl") or "-")
        if checked:
            c = s.get("check") or {}
            row += [_fmt(c.get("rel_err")), _fmt(c.get("cosine"))]
        t.add_row(*row)
    console.print(t)
    for s in report["sites"]:
        if s.get("reason"):
            console.print(f"  site {s['id']}: {s['reason']}")
        if s.get("impl_reason"):
            console.print(f"  site {s['id']}: runs {s['impl']} here, not a faster one: {s['impl_reason']}")
        chosen = _brief(s.get("options") or {}, "=") if s["status"] == "rewritten" else ""
        diag = _brief((s.get("check") or {}).get("diagnostics") or {}, " ")
        if chosen or diag:
            console.print(f"  site {s['id']}: " + " · ".join(x for x in (chosen, diag) if x))
    if costed:
        tb, ta = report["cost"]["before"], report["cost"]["after"]
        if report.get("variant"):
            console.print(f"  cost (forward, all sites): {tb['flops'] / 1e9:.3g} → {ta['flops'] / 1e9:.3g} GFLOP, "
                          f"{tb['bytes'] / 2 ** 20:.3g} → {ta['bytes'] / 2 ** 20:.3g} MiB moved, "
                          f"depth {tb['depth']} → {ta['depth']}")
        else:
            console.print(f"  cost (forward, all sites): {tb['flops'] / 1e9:.3g} GFLOP, "
                          f"{tb['bytes'] / 2 ** 20:.3g} MiB moved, depth {tb['depth']}")
    if report.get("time"):
        tm = report["time"]
        how = "faster" if tm["speedup"] >= 1 else "slower"
        console.print(f"  attention time (all rewritten sites, one input set, median of {tm['repeat']}, this machine): "
                      f"{tm['original_ms']:.3g} ms with SDPA → {tm['rewritten_ms']:.3g} ms rewritten, "
                      f"{tm['speedup']:.2f}× ({how})")
    if checked:
        c = report["check"]
        for o in c["outputs"]:
            console.print(f"  {o['name']}: rel_err {o['rel_err']:.3g}, max_abs_err {o['max_abs_err']:.3g}, "
                          f"cosine {o['cosine']:.6f}")
        if report.get("variant") and report.get("cost") and report.get("time") and c["outputs"]:
            tb, ta, tm = report["cost"]["before"], report["cost"]["after"], report["time"]
            worst = min(o["cosine"] for o in c["outputs"])
            console.print(f"  gained / lost: attention FLOPs ×{ta['flops'] / max(tb['flops'], 1):.2f}, "
                          f"bytes moved ×{ta['bytes'] / max(tb['bytes'], 1):.2f}, measured attention speed "
                          f"×{tm['speedup']:.2f} of SDPA's; output cosine {worst:.6f}, rel_err {c['rel_err']:.3g}")
        if c.get("impl_calls"):
            console.print("  op calls in the check, by implementation: "
                          + ", ".join(f"{k} {v}" for k, v in sorted(c["impl_calls"].items())))
        verdict = {True: "PASSED", False: "FAILED", None: "not gated"}[c["passed"]]
        tol = f" (tolerance {c['tolerance']:g})" if c["tolerance"] is not None else ""
        console.print(f"  end-to-end rel_err {c['rel_err']:.3g}{tol}: {verdict}")


def plot(report: dict, path) -> None:
    """A PNG: per site, forward GFLOP before/after (log scale) beside the site's rel_err."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    sites = [s for s in report["sites"] if s.get("cost")]
    ids = [s["id"] for s in sites]
    before = [s["cost"]["before"]["flops"] / 1e9 for s in sites]
    after = [s["cost"]["after"]["flops"] / 1e9 for s in sites]
    w = 0.4
    ax1.bar([i - w / 2 for i in ids], before, w, label="before (exact)")
    ax1.bar([i + w / 2 for i in ids], after, w, label=f"after ({report.get('variant') or 'exact'})")
    ax1.set(yscale="log", xlabel="site", ylabel="forward GFLOP", title="cost per site", xticks=ids)
    ax1.legend()
    errs = [(s.get("check") or {}).get("rel_err") for s in sites]
    ax2.bar(ids, [e if isinstance(e, (int, float)) else 0 for e in errs], color="tab:red")
    ax2.set(xlabel="site", ylabel="rel_err vs original", title="error per site", xticks=ids)
    fig.suptitle(str(report.get("model") or "model"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
