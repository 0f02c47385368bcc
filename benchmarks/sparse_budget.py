"""Block-sparse accuracy: how the blocks are ranked (select) and how the density is spread (budget).

    .venv/bin/python benchmarks/sparse_budget.py [--length 256] [--block 16] [--densities 0.05,0.1,0.25]

Two pretrained models, the blocks chosen on example inputs and the accuracy read on held-out ones:
1. all-MiniLM-L6-v2: example inputs = the docstrings of four stdlib modules (the first calibration
   set of calibration_effect.py); held out = those of re, argparse, json, csv; each cut/padded to
   --length tokens. Reported: mean sentence-embedding cosine to the original.
2. The char GPT (examples/char_gpt.py, causal, 256 characters): example inputs = 8 training
   windows; held out = 32 validation windows. Reported: next-character KL(original ‖ rewritten), nats.
For each density: budget=uniform (every head keeps ⌈density · visible blocks⌉ per query block) and
budget=global (one target spread over every head of every site by the mass each keeps on the
example inputs), given as its density the fraction of blocks uniform really kept on the example
inputs (so both keep the same total there), both with select=exact; then select=pooled (block
means of q and k, no dense scores) with the uniform budget. Beside the accuracy: `mass`, the mean
dense softmax mass each row keeps, and `kept`, the fraction of the visible key blocks kept
(summed over query blocks, heads and sites), both on the held-out inputs with the options each
site was given.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attnrewrite import pipeline  # noqa: E402
from attnrewrite.frontends.export import ExportFrontEnd, demo_model, export  # noqa: E402
from attnrewrite.variants import sparse  # noqa: E402
from calibration_effect import CALIBRATION_MODULES, texts  # noqa: E402
from results_real_weights import DOC_MODULES  # noqa: E402
from examples import char_gpt as cg  # noqa: E402


def compare(densities, block, rewrite, score, stats) -> list[list]:
    """Rows (density, setting, score, mass, kept): uniform, then global given the fraction of blocks
    uniform really kept on the example inputs (⌈·⌉ per query block keeps more than `density`), so
    both keep the same total; then select=pooled."""
    rows = []
    for d in densities:
        opts = {"mode": "block", "block": block, "density": d}
        res = rewrite(opts)
        same = stats(res, on_example=True)[1]
        for name, r in (("uniform", res), (f"global (density {same:.3f})", rewrite({**opts, "density": same,
                                                                                    "budget": "global"})),
                        ("pooled", rewrite({**opts, "select": "pooled"}))):
            mass, kept = stats(r, on_example=False)
            rows.append([f"{d:g}", name, score(r), f"{mass:.3f}", f"{kept:.3f}"])
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def held_out_stats(ep, held_out, result) -> tuple[float, float]:
    """(mean kept mass per row, fraction of visible pairs kept) over every rewritten site, on held_out."""
    fe = ExportFrontEnd(ep, [held_out], "given")
    sites, _ = fe.find_sites()
    runs = fe.capture(sites, fe.inputs)
    pipeline.fill_causal(sites, runs)
    options = {s.id: s.options for s in result.sites if s.status == "rewritten"}
    masses, kept = [], []
    for site in sites:
        if site.id not in options:
            continue
        for smp in pipeline.samples(fe, site, runs[site.id]):
            q, k, mask, causal = smp["q"], smp["k"], smp["mask"], bool(smp["causal"])
            d = sparse.diagnostics(q, k, None, mask, smp["scale"], smp["softcap"], causal, options[site.id])
            masses.append(d["retained_mass_mean"])
            o = sparse._options(options[site.id])
            count, _ = sparse._block_stats(mask, causal, q.shape[-2], k.shape[-2], o["block"], q.device)
            visible = (count > 0).sum(-1, keepdim=True).expand(q.shape[0], q.shape[1], -1, -1)
            kept.append(sparse._n_keep(count, o, q.shape[1]).expand_as(visible).sum().item() / visible.sum().item())
    return statistics.fmean(masses), statistics.fmean(kept)


def minilm(length: int, densities, block: int) -> list[list]:
    """Rows for all-MiniLM-L6-v2 (score: mean embedding cosine on the held-out texts)."""
    model, tok = demo_model()

    def enc(t):
        e = tok(t, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
        return (e["input_ids"], e["attention_mask"]), {}

    held_out, example = enc(texts(DOC_MODULES)), enc(texts(CALIBRATION_MODULES[:4]))
    ep = export(model, *held_out)
    with torch.no_grad():
        ref = ep.module()(*held_out[0])

    def score(res):
        with torch.no_grad():
            got = res.program.module()(*held_out[0])
        return f"{torch.nn.functional.cosine_similarity(ref, got, dim=-1).mean().item():.4f}"
    return compare(densities, block,
                   lambda o: pipeline.rewrite(ExportFrontEnd(ep, [example], "given"), "sparse", o, check=False),
                   score, lambda res, on_example: held_out_stats(ep, example if on_example else held_out, res))


def char_gpt(densities, block: int) -> list[list]:
    """Rows for the char GPT (score: KL on the held-out windows)."""
    model = cg.load()
    train_ids, val_ids = cg.splits()
    x, _ = cg.windows(val_ids, 32, model.config.context, seed=7)
    example, _ = cg.windows(train_ids, 8, model.config.context, seed=11)
    xs = x.split(8)
    ep = export(model, (xs[0],))
    with torch.no_grad():
        ref = [ep.module()(xb).double().log_softmax(-1) for xb in xs]

    def score(res):
        new = res.program.module()
        with torch.no_grad():
            return f"{statistics.fmean((lp.exp() * (lp - new(xb).double().log_softmax(-1))).sum(-1).mean().item() for xb, lp in zip(xs, ref)):.4g}"
    return compare(densities, block,
                   lambda o: pipeline.rewrite(ExportFrontEnd(ep, [((example,), {})], "given"), "sparse", o,
                                              check=False),
                   score, lambda res, on_example: held_out_stats(ep, ((example,), {}) if on_example else ((xs[0],), {}), res))


def table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=256, help="MiniLM tokens per text")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--densities", default="0.05,0.1,0.25")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    densities = [float(x) for x in a.densities.split(",")]
    print(f"MiniLM, L = {a.length}, block {a.block}: mean embedding cosine on held-out texts\n")
    print(table(["density", "setting", "cosine", "mass", "kept"], minilm(a.length, densities, a.block)))
    print(f"\nchar GPT, L = 256, block {a.block}: KL(original ‖ rewritten) on held-out windows, nats\n")
    print(table(["density", "setting", "KL", "mass", "kept"], char_gpt(densities, a.block)))


if __name__ == "__main__":
    main()
