"""Does calibration close the gap? Aggressive approximate rewrites, before and after `--calibrate`.

    .venv/bin/python benchmarks/calibration_effect.py [--length 128]

1. all-MiniLM-L6-v2 (pretrained): evaluation = the module docstrings of re, argparse, json,
   csv (the held-out texts of results_real_weights.py), each cut to --length tokens;
   calibration = the docstrings of twelve *other* stdlib modules (three input sets of four).
   Reported: mean sentence-embedding cosine to the original, uncalibrated and calibrated.
2. The char GPT (examples/char_gpt.py): evaluation = 32 windows of 256 characters from the
   validation slice; calibration = 24 windows from the training slice (three sets of eight).
   Reported: next-character KL(original ‖ rewritten), nats, uncalibrated and calibrated.
Calibration and evaluation inputs never overlap; the pipeline checks on the evaluation set.
"""
from __future__ import annotations

import argparse
import inspect
import importlib
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from attnrewrite import pipeline  # noqa: E402
from attnrewrite.frontends.export import ExportFrontEnd, demo_model, export  # noqa: E402
from results_real_weights import DOC_MODULES, setting_name  # noqa: E402

CALIBRATION_MODULES = ("os", "collections", "string", "typing", "unittest", "subprocess", "socket", "heapq",
                       "itertools", "sqlite3", "copy", "random")
SETTINGS = [("sparse", {"mode": "topk", "k": 8}), ("sparse", {"mode": "window", "window": 16}),
            ("conv_basis", {"k": 4}), ("conv_basis", {"k": 16})]


def texts(modules) -> list[str]:
    return [inspect.getdoc(importlib.import_module(m)) for m in modules]


def minilm(length: int) -> list[list]:
    model, tok = demo_model()

    def enc(t):
        e = tok(t, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
        return (e["input_ids"], e["attention_mask"]), {}

    evaluation = enc(texts(DOC_MODULES))
    cal = texts(CALIBRATION_MODULES)
    calibration = [enc(cal[i:i + 4]) for i in range(0, len(cal), 4)]
    ep = export(model, *evaluation)
    ref = ep.module()(*evaluation[0])
    rows = []
    for variant, options in SETTINGS:
        cos = []
        for sets, n in (([evaluation], 0), (calibration + [evaluation], len(calibration))):
            res = pipeline.rewrite(ExportFrontEnd(ep, sets, "given"), variant, dict(options), calibrate=n)
            with torch.no_grad():
                got = res.program.module()(*evaluation[0])
            cos.append(torch.nn.functional.cosine_similarity(ref, got, dim=-1).mean().item())
        rows.append([setting_name(variant, options), f"{cos[0]:.4f}", f"{cos[1]:.4f}"])
        print(f"  MiniLM {rows[-1]}", file=sys.stderr)
    return rows


def char_gpt() -> list[list]:
    from examples import char_gpt as cg
    model = cg.load()
    train_ids, val_ids = cg.splits()
    x, _ = cg.windows(val_ids, 32, model.config.context, seed=7)
    c, _ = cg.windows(train_ids, 24, model.config.context, seed=11)
    xs, cs = x.split(8), c.split(8)
    ep = export(model, (xs[0],))
    with torch.no_grad():
        ref = [ep.module()(xb).double().log_softmax(-1) for xb in xs]
    rows = []
    for variant, options in SETTINGS:
        kls = []
        for sets, n in (([((xs[0],), {})], 0), ([((cb,), {}) for cb in cs] + [((xs[0],), {})], len(cs))):
            res = pipeline.rewrite(ExportFrontEnd(ep, sets, "given"), variant, dict(options), calibrate=n)
            new = res.program.module()
            with torch.no_grad():
                kl = [(lp.exp() * (lp - new(xb).double().log_softmax(-1))).sum(-1).mean().item()
                      for xb, lp in zip(xs, ref)]
            kls.append(statistics.fmean(kl))
        rows.append([setting_name(variant, options), f"{kls[0]:.4g}", f"{kls[1]:.4g}"])
        print(f"  char GPT {rows[-1]}", file=sys.stderr)
    return rows


def table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=128)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    print(f"MiniLM, L = {a.length}: mean embedding cosine on held-out texts\n")
    print(table(["setting", "uncalibrated", "calibrated (3 sets)"], minilm(a.length)))
    print("\nchar GPT: KL(original ‖ rewritten) on held-out windows, nats\n")
    print(table(["setting", "uncalibrated", "calibrated (3 sets)"], char_gpt()))


if __name__ == "__main__":
    main()
