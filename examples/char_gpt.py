"""A small character-level GPT trained on Python's own standard library sources.

    python examples/char_gpt.py train --out examples/char_gpt.pt    # ~4 min on 2 CPU cores
    attnrewrite examples.char_gpt:factory --list                     # from the repo root

Data: the top-level `*.py` files of `sysconfig.get_paths()['stdlib']`, sorted by name and
concatenated; the last 10% of the characters is the validation slice. Characters outside
printable ASCII (plus tab and newline) become '?', so the vocabulary is fixed (97 chars)
whatever the Python version. Attention is `F.scaled_dot_product_attention(is_causal=True)`.

The checkpoint is a plain dict {config, state_dict, vocab} that loads with
`torch.load(weights_only=True)`; it is small (~3 MB) and committed, so results that use it
reproduce without retraining.
"""
from __future__ import annotations

import argparse
import math
import string
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attnrewrite.io import InputError

CHECKPOINT = Path(__file__).with_name("char_gpt.pt")
VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))   # 97 characters; others map to '?'


@dataclass
class Config:
    vocab_size: int = len(VOCAB)
    n_layers: int = 3
    d_model: int = 128
    n_heads: int = 4
    context: int = 256


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads = c.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.mlp = nn.Sequential(nn.Linear(c.d_model, 4 * c.d_model), nn.GELU(), nn.Linear(4 * c.d_model, c.d_model))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.tok.weight                # tied embeddings
        for name, p in self.named_parameters():
            if p.dim() == 2:                               # GPT-2 init: N(0, 0.02), residual outputs scaled down
                std = 0.02 / math.sqrt(2 * c.n_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):                               # (B, T) int64 -> (B, T, vocab) logits
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


# --- data -------------------------------------------------------------------------------

def encode(text: str) -> torch.Tensor:
    index = {ch: i for i, ch in enumerate(VOCAB)}
    unknown = index["?"]
    return torch.tensor([index.get(ch, unknown) for ch in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids)


def stdlib_text() -> str:
    """The top-level stdlib sources, sorted by file name, concatenated (a few MB)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def splits(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, validation ids): the last `val_fraction` of the characters is held out."""
    data = encode(stdlib_text())
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def windows(data: torch.Tensor, n: int, context: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random (input, next-char target) windows of length `context`."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - context - 1, (n,), generator=g)
    x = torch.stack([data[s:s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + context + 1] for s in starts.tolist()])
    return x, y


# --- train / load -------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: CharGPT, data: torch.Tensor, n: int = 64, seed: int = 1) -> float:
    """Mean next-char cross-entropy (nats) on n fixed windows."""
    model.eval()
    x, y = windows(data, n, model.config.context, seed)
    losses = [F.cross_entropy(model(xb).flatten(0, 1), yb.flatten()) for xb, yb in zip(x.split(16), y.split(16))]
    model.train()
    return float(torch.stack(losses).mean())


def train(out: Path, steps: int, batch: int, lr: float, seed: int = 0, every: int = 50, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train_ids, val_ids = splits()
    print(f"data: {len(train_ids):,} train chars, {len(val_ids):,} validation chars, vocab {len(VOCAB)}")
    c = Config()
    model = CharGPT(c)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {asdict(c)}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    g = torch.Generator().manual_seed(seed)
    t0, running = time.perf_counter(), []
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train_ids) - c.context - 1, (batch,), generator=g).tolist()
        x = torch.stack([train_ids[s:s + c.context] for s in starts])
        y = torch.stack([train_ids[s + 1:s + c.context + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % every == 0 or step == steps:
            print(f"step {step:5d}  train {sum(running) / len(running):.3f}  val {evaluate(model, val_ids):.3f}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            running = []
    val = evaluate(model, val_ids, n=256, seed=2)
    print(f"final: {steps} steps in {time.perf_counter() - t0:.0f} s; validation {val:.3f} nats/char "
          f"= {val / math.log(2):.3f} bits/char (256 windows of {c.context})")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    torch.save({"config": asdict(c), "state_dict": state, "vocab": VOCAB}, out)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)")


def load(path: Path = CHECKPOINT) -> CharGPT:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: train it first with "
                                f"`python examples/char_gpt.py train --out {path}`")
    ck = torch.load(path, weights_only=True, map_location="cpu")
    if ck["vocab"] != VOCAB:
        raise ValueError(f"{path} was trained with another vocabulary")
    model = CharGPT(Config(**ck["config"]))
    model.load_state_dict(ck["state_dict"], strict=False)   # head.weight is tied to tok.weight
    return model.eval()


def factory():
    """(model, example_args) for `attnrewrite examples.char_gpt:factory`: 2 validation windows."""
    try:
        model = load()
    except FileNotFoundError as e:
        raise InputError(str(e)) from None                # the CLI prints it as one line, exit 2
    _, val_ids = splits()
    x, _ = windows(val_ids, 2, model.config.context, seed=3)
    return model, (x,)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on the stdlib sources and save a checkpoint")
    t.add_argument("--out", type=Path, default=CHECKPOINT)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    args = ap.parse_args(argv)
    train(args.out, args.steps, args.batch, args.lr, args.seed, threads=args.threads)


if __name__ == "__main__":
    main()
