"""The cost block in every report, --list included, and the --plot PNG."""
from __future__ import annotations

import json

import torch

import attnrewrite
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
