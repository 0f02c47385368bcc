"""Train the long-context byte LM (model.py) on the stdlib corpus (data.py) and save charlm.pt.

    OMP_NUM_THREADS=1 python benchmarks/longctx/train.py            # the committed checkpoint

Three phases on one learning-rate schedule:

1. `--steps-copy` steps of pure copying (data.copy_rows): rows of `--len-copy` random
   characters in which one short string occurs twice. Only finding the first occurrence lowers
   their loss, so the model grows an induction head here, in about three minutes. Without this
   phase it never did: with plain text and planted lines alone, earlier runs of up to an hour
   stayed at chance on the recall probe (benchmarks/RESULTS.md).
2. `--steps-short` steps on text windows of `--len-short` bytes.
3. `--steps-long` steps on text windows of `--len-long` bytes (the model is trained at 4096).

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then a cosine decay to a
tenth of `--lr` across all phases, gradient norm clipped to 1. The peak learning rate matters:
at 3e-3 a model this size did not learn to copy even on pure copy rows, at 1e-3 it does.

In the text phases a fraction `--plant` of the windows gets planted recall pairs (data.plant):
four `key_NN = "value"` lines at the first line start, then 1 to `--recalls` lines
`print(key_NN)  # value` at uniformly random line starts later in the window, so the model
sees recall at every distance up to about the window length; a fraction `--repeat` of the other
windows gets a random string repeated on two to four lines (data.plant_repeats).

Everything random comes from `--seed` (window offsets, planting, copy rows, initialisation),
and one CPU thread is used, so the same arguments on the same machine and Python should give
the same weights (the committed 26-minute run was done once, not repeated). `--minutes` is a safety stop: if the budget runs out, training stops where it is,
saves, and says so (the schedule is then not finished and the weights differ from a full run).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as D          # noqa: E402
import model as M         # noqa: E402


def make_batch(stream: torch.Tensor, length: int, batch: int, plant: float, rng: random.Random,
               recalls: int = 4, repeat: float = 0.0):
    """(batch, length + 1) int64 windows of `stream`: a share `plant` of them with recall pairs
    (1 to `recalls` recalls each), a share `repeat` of the rest with a repeated random string."""
    rows = []
    for _ in range(batch):
        at = rng.randrange(len(stream) - length - 1)
        text = bytes(stream[at: at + length + 1].numpy())
        if rng.random() < plant:
            pairs = D.random_pairs(rng, 4)
            n_rec = rng.randint(1, recalls)
            hi = max(65, length - 260)
            recalls_at = [(rng.randrange(4), rng.randrange(64, hi)) for _ in range(n_rec)]
            text = D.plant(text, pairs, recalls_at)[0][: length + 1]
        elif rng.random() < repeat:
            text = D.plant_repeats(text, rng)[: length + 1]
        rows.append(torch.frombuffer(bytearray(text), dtype=torch.uint8))
    return torch.stack(rows).long()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(M.DEFAULT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-copy", type=int, default=1000,
                    help="steps of random-character copying (data.copy_rows) before any text")
    ap.add_argument("--len-copy", type=int, default=32)
    ap.add_argument("--batch-copy", type=int, default=64)
    ap.add_argument("--steps-short", type=int, default=800)
    ap.add_argument("--len-short", type=int, default=1024)
    ap.add_argument("--batch-short", type=int, default=8)
    ap.add_argument("--steps-long", type=int, default=200)
    ap.add_argument("--len-long", type=int, default=4096)
    ap.add_argument("--batch-long", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--plant", type=float, default=0.5)
    ap.add_argument("--recalls", type=int, default=8, help="most recall lines in a planted sequence")
    ap.add_argument("--repeat", type=float, default=0.4,
                    help="share of the unplanted sequences that get a repeated random string")
    ap.add_argument("--conv", type=int, default=8,
                    help="width of the causal convolution in front of each attention (0: none)")
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--probe-every", type=int, default=200,
                    help="log the recall probe at about 300 bytes (24 validation probes) this often")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train, val = D.corpus()
    print(f"corpus: train {len(train):,} bytes, validation {len(val):,} bytes", flush=True)
    model = M.ByteLM(**M.CONFIG, conv=args.conv)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    print(f"model: {model.config}, {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)

    probes = D.probe_set(val, 300, 24)
    total = args.steps_copy + args.steps_short + args.steps_long
    t0, seen, stopped, ema = time.time(), 0, None, None
    for step in range(total):
        if time.time() - t0 > 60 * args.minutes:
            stopped = step
            break
        if step < args.steps_copy:
            length, batch = args.len_copy - 1, args.batch_copy
            xb = D.copy_rows(rng, batch, args.len_copy)
        else:
            long = step >= args.steps_copy + args.steps_short
            length, batch = (args.len_long, args.batch_long) if long else (args.len_short, args.batch_short)
            xb = make_batch(train, length, batch, args.plant, rng, args.recalls, args.repeat)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr, args.warmup)
        logits = model(xb[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += xb[:, 1:].numel()
        bits = loss.item() / math.log(2)
        ema = bits if ema is None else 0.98 * ema + 0.02 * bits
        if step % args.log_every == 0 or step == total - 1:
            print(f"step {step:5d} len {length:5d} lr {opt.param_groups[0]['lr']:.2e} "
                  f"bits/char {bits:.3f} (avg {ema:.3f}) tokens {seen:,} {time.time() - t0:7.1f}s", flush=True)
        if args.probe_every and step % args.probe_every == 0:
            model.eval()
            print(f"step {step:5d} probe at ~300 bytes: char acc {D.probe_accuracy(model, probes)['char_acc']:.3f}",
                  flush=True)
            model.train()

    model.eval()
    M.save(model, args.out)
    elapsed = time.time() - t0
    print(f"trained {stopped if stopped is not None else total} of {total} steps, {seen:,} tokens, "
          f"{elapsed / 60:.1f} min; saved {args.out}", flush=True)
    if stopped is not None:
        print(f"STOPPED EARLY by --minutes {args.minutes}: the schedule did not finish", flush=True)
    with torch.no_grad():
        print(f"validation bits/char at 1024 (8 windows): {M.bits_per_char(model, val, 1024, max_windows=8):.3f}")


if __name__ == "__main__":
    main()
