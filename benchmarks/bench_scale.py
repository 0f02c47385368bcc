"""Peak memory and time of detect + rewrite + check on a large transformer (random weights).

    python benchmarks/bench_scale.py [--layers 24] [--hidden 1024] [--seq 128] [--variant exact]

Builds a BERT of the given size, exports it with torch.export, runs the pipeline (detect once,
capture, rewrite, check per site and end to end) and prints the peak resident memory after
each stage (ru_maxrss) next to the size of the weights, so what the check holds beyond the
model is visible.
"""
from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch
import transformers as T

from attnrewrite import pipeline
from attnrewrite.frontends.export import ExportFrontEnd


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--variant", default="exact")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                       intermediate_size=4 * a.hidden, vocab_size=30522, attn_implementation="sdpa")
    model = T.BertModel(cfg).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    print(f"model: {a.layers} layers, hidden {a.hidden}, weights {weights:.0f} MiB; peak after build "
          f"{peak_mib():.0f} MiB")
    kw = {"input_ids": torch.randint(0, 30522, (a.batch, a.seq)), "attention_mask": torch.ones(a.batch, a.seq,
                                                                                                dtype=torch.long)}
    t = time.perf_counter()
    ep = torch.export.export(model, (), kw, strict=False)
    print(f"export {time.perf_counter() - t:.1f} s; peak {peak_mib():.0f} MiB")
    fe = ExportFrontEnd(ep, [((), kw)], "given")
    t = time.perf_counter()
    res = pipeline.rewrite(fe, a.variant, {})
    tm = res.report["timings"]
    print(f"pipeline {time.perf_counter() - t:.1f} s (detect {tm['detect_s']:.2f}, rewrite {tm['rewrite_s']:.1f}, "
          f"check {tm['check_s']:.1f}); {sum(s.status == 'rewritten' for s in res.sites)} sites rewritten; "
          f"end-to-end rel_err {res.report['check']['rel_err']:.2e}; peak {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
