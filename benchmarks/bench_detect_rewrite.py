"""Load + detect + rewrite time for a 12-layer BERT-base-sized export, vs torch.export itself.

    .venv/bin/python benchmarks/bench_detect_rewrite.py [--layers 12] [--seq 128] [--impl eager|sdpa]

Goal (issue 2): detection + rewriting cost < 10% of the torch.export time of the same model.
"""
import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--impl", default="eager")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from transformers import BertConfig, BertModel

    from attnrewrite.passes import fx_detect
    from attnrewrite.passes.fx_rewrite import constants_of, params_of, rewrite_program
    from attnrewrite.variants import VARIANTS

    cfg = BertConfig(num_hidden_layers=a.layers, attn_implementation=a.impl)   # BERT-base sizes
    model = BertModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, a.seq))
    mask = torch.ones(1, a.seq, dtype=torch.long)
    rows = []
    for dialect in ("training IR", "core ATen"):
        t_export, t_detect, t_rewrite, n = [], [], [], 0
        for _ in range(a.repeat):
            t = time.perf_counter()
            ep = torch.export.export(model, (ids,), {"attention_mask": mask})
            if dialect == "core ATen":
                ep = ep.run_decompositions()
            t_export.append(time.perf_counter() - t)
            t = time.perf_counter()
            sites, _ = fx_detect.find_sites(ep.graph, params_of(ep), constants_of(ep))
            t_detect.append(time.perf_counter() - t)
            t = time.perf_counter()
            rewrite_program(ep, VARIANTS["exact"], lambda s: {})
            t_rewrite.append(time.perf_counter() - t)
            n = len(sites)
        e, d, r = min(t_export), min(t_detect), min(t_rewrite)
        rows.append((dialect, n, e, d, r, (d + r) / e))
    print(f"BERT-base-sized ({a.layers} layers, hidden 768, seq {a.seq}, attn {a.impl}), best of {a.repeat}")
    print("| graph | sites | torch.export s | detect s | rewrite s | (detect+rewrite)/export |")
    print("|---|---|---|---|---|---|")
    for dialect, n, e, d, r, ratio in rows:
        print(f"| {dialect} | {n} | {e:.2f} | {d:.3f} | {r:.3f} | {ratio:.1%} |")


if __name__ == "__main__":
    main()
