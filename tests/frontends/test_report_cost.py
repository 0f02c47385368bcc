"""The cost block in every report, --list included, and the --plot PNG."""
from __future__ import annotations

import json

import pytest
import torch

import attnrewrite
from attnrewrite.check import original_attention
from attnrewrite.variants import exact
from attnrewrite.cli import main
from attnrewrite.cost import site_cost
from _models import TinyAttention


def program(n=64):
    torch.manual_seed(0)
    return torch.export.export(TinyAttention().eval(), (torch.randn(2, n, 16),))


def test_every_rewritten_site_has_before_and_after_and_the_total_sums_them():
    r = attnrewrite.rewrite(program(), "sparse", mode="window", window=8)
    rep = r.report
    site = rep["sites"][0]
    want_before = site_cost(r.sites[0], "exact", {})
    want_after = site_cost(r.sites[0], "sparse", r.sites[0].options)
    assert site["cost"]["before"]["flops"] == want_before["flops"]
    assert site["cost"]["after"]["flops"] == want_after["flops"] < want_before["flops"]
    assert rep["cost"]["before"]["flops"] == sum(s["cost"]["before"]["flops"] for s in rep["sites"])
    assert set(site["cost"]["after"]) == {"flops", "bytes", "peak_extra_bytes", "depth"}


def test_exact_costs_what_it_replaces_and_symbolic_sizes_are_priced():
    torch.manual_seed(0)
    n = torch.export.Dim("n", min=2, max=128)
    ep = torch.export.export(TinyAttention().eval(), (torch.randn(2, 40, 16),), dynamic_shapes=({1: n},))
    rep = attnrewrite.rewrite(ep, "exact").report
    c = rep["sites"][0]["cost"]
    assert isinstance(rep["sites"][0]["q_len"], str)                # symbolic, priced at the inputs' 40
    assert c["before"] == c["after"] and c["before"]["flops"] > 2 * 2 * 2 * 40 * 40 * 8


def test_list_shows_cost_and_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "m.pt2"
    torch.export.save(program(32), path)
    assert main([str(path), "--list", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["sites"][0]["cost"]["before"]["flops"] > 0 and rep["cost"]["before"]["depth"] > 0
    png = tmp_path / "cost.png"
    assert main([str(path), "--variant", "sparse", "--set", "k=4", "--plot", str(png), "-o",
                 str(tmp_path / "out.pt2")]) == 0
    capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# ------------------------------------------------------------------ measured attention time

@pytest.mark.parametrize("causal, mask_kind, kv_heads, softcap", [
    (False, None, 4, 0.0), (True, None, 4, 0.0), (True, "bool", 2, 0.0), (False, "additive", 1, 0.0),
    (True, "bool", 4, 5.0)])
def test_the_timed_original_is_the_sites_exact_attention(causal, mask_kind, kv_heads, softcap):
    """What the report times as "original" computes the same attention as the exact reference."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k, v = torch.randn(2, kv_heads, 11, 16, generator=g), torch.randn(2, kv_heads, 11, 16, generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 9, 11, generator=g) > 0.3
        mask[..., -1] = True                       # no row loses every key
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, 1, 11, generator=g)
    want = exact.reference(q, k, v, mask, 0.3, softcap, causal, 0.0)
    got = original_attention(q, k, v, mask, 0.3, softcap, causal)()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_report_times_every_rewritten_site():
    m, x = TinyAttention().eval(), torch.randn(2, 6, 16)
    r = attnrewrite.rewrite(torch.export.export(m, (x,)), "sparse", k=3)
    rewritten = [s for s in r.report["sites"] if s["status"] == "rewritten"]
    assert rewritten and all(s["time"]["original_ms"] > 0 and s["time"]["rewritten_ms"] > 0 for s in rewritten)
    tm = r.report["time"]
    assert tm["sites"] == len(rewritten)
    assert tm["original_ms"] == pytest.approx(sum(s["time"]["original_ms"] for s in rewritten))
    assert tm["speedup"] == pytest.approx(tm["original_ms"] / tm["rewritten_ms"])
