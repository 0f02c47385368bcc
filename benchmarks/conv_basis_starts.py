"""conv-basis start columns: `starts=norm` (largest difference norm) vs `starts=search` (binary search).

    .venv/bin/python benchmarks/conv_basis_starts.py [--ks 4,16,64] [--lengths 128,256,512]
                                                     [--search 1e-9:1,1:1] [--threads 2]

1. all-MiniLM-L6-v2 (pretrained, the built-in demo model): the held-out texts of
   results_real_weights.py (module docstrings of re, argparse, json, csv), each cut or padded
   to exactly L tokens; one export per L. Reported: mean cosine of the sentence embeddings
   to the original's (min in parentheses).
2. The char GPT (examples/char_gpt.py, committed checkpoint): 16 validation windows of L
   characters (L ≤ its context of 256). Reported: next-character KL(original ‖ rewritten) in
   nats, averaged over positions.
Every site is rewritten with `pipeline.rewrite(..., check=False)` at each k; `--search`
lists the search settings as delta:segment pairs (the co-authors' defaults are 1e-9:1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attnrewrite import pipeline  # noqa: E402
from attnrewrite.frontends.export import ExportFrontEnd, demo_model, export  # noqa: E402
from examples import char_gpt as cg  # noqa: E402
from results_real_weights import minilm_inputs  # noqa: E402


def settings(ks, search) -> list[tuple[str, dict]]:
    out = []
    for k in ks:
        out.append((f"norm, k={k}", {"k": k, "starts": "norm"}))
        for delta, segment in search:
            out.append((f"search δ={delta:g} T={segment}, k={k}", {"k": k, "starts": "search", "delta": delta,
                                                                    "segment": segment}))
    return out


def minilm(lengths, runs) -> dict:
    """{(setting, L): (mean cosine, min cosine)}."""
    model, tok = demo_model()
    out = {}
    for length in lengths:
        args = minilm_inputs(tok, length)
        ep = export(model, args)
        with torch.no_grad():
            ref = ep.module()(*args)
        for name, options in runs:
            res = pipeline.rewrite(ExportFrontEnd(ep, [(args, {})], "given"), "conv_basis", dict(options),
                                   check=False)
            with torch.no_grad():
                got = res.program.module()(*args)
            cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
            out[name, length] = (cos.mean().item(), cos.min().item())
            print(f"  MiniLM L={length} {name}: cos {cos.mean().item():.4f}", file=sys.stderr, flush=True)
    return out


def char_gpt(lengths, runs, windows: int = 16) -> dict:
    """{(setting, L): mean next-character KL(original ‖ rewritten)}; L beyond the context is skipped."""
    model = cg.load()
    _, val_ids = cg.splits()
    out = {}
    for length in lengths:
        if length > model.config.context:
            continue
        x, _ = cg.windows(val_ids, windows, length, seed=11)
        ep = export(model, (x,))
        with torch.no_grad():
            ref = ep.module()(x).double().log_softmax(-1)
        for name, options in runs:
            res = pipeline.rewrite(ExportFrontEnd(ep, [((x,), {})], "given"), "conv_basis", dict(options),
                                   check=False)
            with torch.no_grad():
                got = res.program.module()(x).double().log_softmax(-1)
            kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
            out[name, length] = kl
            print(f"  char GPT L={length} {name}: KL {kl:.4g}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="4,16,64")
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--search", default="1e-9:1,1:1", help="delta:segment pairs for starts=search")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-gpt", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    search = [(float(p.split(":")[0]), int(p.split(":")[1])) for p in args.search.split(",") if p]
    runs = settings(ks, search)
    cos = minilm(lengths, runs)
    kl = {} if args.skip_gpt else char_gpt(lengths, runs)
    head = ["setting"] + [f"MiniLM cos L={n}" for n in lengths] + [f"char GPT KL L={n}" for n in lengths
                                                                    if any(key[1] == n for key in kl)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, _ in runs:
        cells = [f"{cos[name, n][0]:.4f} ({cos[name, n][1]:.3f})" for n in lengths]
        cells += [f"{kl[name, n]:.4f}" for n in lengths if (name, n) in kl]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
