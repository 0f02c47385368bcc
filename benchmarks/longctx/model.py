"""A small byte-level causal language model for long-context quality checks.

The network is a pre-norm decoder-only transformer over raw bytes (vocabulary 256), written
with plain torch operations so that `torch.export` sees one
`F.scaled_dot_product_attention(q, k, v, is_causal=True)` call per layer, which is the spelling
attnrewrite's detectors anchor on. Positions enter only through rotary embeddings (RoPE) on
q and k, so there is no learned position table with a maximum length: the model runs at any
length. How well it does past the length it was trained at is measured, not promised: the
committed checkpoint, trained at 4096, loses about 0.15 bits/char by 16384
(benchmarks/RESULTS.md, "Long-context model").

Rotary embeddings are applied to the first `rope_dims` channels of each head; the remaining
channels carry no position at all. The position-free channels are there so a head could match
content at any distance (what the recall probe in data.py asks for), the rotated ones for the
local, order-aware heads that text needs.

With `conv` > 0 (the committed checkpoint has 8) each layer runs a causal depthwise convolution
of that width over its normalised input before q, k and v, so a key can hold the few bytes
before it. It starts as "add the previous byte", which makes copying (find where the current
bytes occurred before, predict what followed) a one-layer pattern that training finds
quickly; a model without it did not learn to copy here (benchmarks/RESULTS.md). The
convolution is outside the attention, so the exported graph still has one SDPA call per layer.

The checkpoint (`charlm.pt` beside this file) is a plain dict {"config": {...ints/floats},
"state_dict": {...tensors}} that `torch.load(weights_only=True)` reads.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT = Path(__file__).with_name("charlm.pt")

CONFIG = dict(vocab=256, n_layers=3, d_model=128, n_heads=4, rope_dims=16, mlp_mult=4,
              rope_base=10000.0)


def _rope_tables(length: int, dims: int, base: float, device, dtype):
    """cos and sin of shape (length, dims) for rotating channel pairs (i, i + dims/2)."""
    half = dims // 2
    inv_freq = base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x, cos, sin, dims: int):
    """Rotate the first `dims` channels of x (B, H, T, D) by the position angles; keep the rest."""
    half = dims // 2
    r, rest = x[..., :dims], x[..., dims:]
    r1, r2 = r[..., :half], r[..., half:]
    turned = torch.cat([-r2, r1], dim=-1)
    return torch.cat([r * cos + turned * sin, rest], dim=-1)


class Block(nn.Module):
    """One pre-norm layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, n_heads: int, rope_dims: int, mlp_mult: int, conv: int = 0):
        super().__init__()
        self.n_heads, self.rope_dims = n_heads, rope_dims
        self.norm1 = nn.LayerNorm(d_model)
        self.conv = None
        if conv:
            # a short causal depthwise convolution in front of q, k and v, started as "add the
            # previous byte": a key then knows the bytes just before it, so one attention layer
            # can find "the place after the last time these bytes occurred" (copying)
            self.conv = nn.Conv1d(d_model, d_model, conv, groups=d_model, bias=False)
            with torch.no_grad():
                self.conv.weight.zero_()
                if conv > 1:
                    self.conv.weight[:, 0, conv - 2] = 1.0
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, mlp_mult * d_model)
        self.down = nn.Linear(mlp_mult * d_model, d_model)
        self.span = None          # evaluation only: hide keys further back than this many positions

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        h = self.n_heads
        z = self.norm1(x)
        if self.conv is not None:
            w = self.conv.kernel_size[0]
            z = z + self.conv(F.pad(z.transpose(1, 2), (w - 1, 0))).transpose(1, 2)
        q, k, v = self.qkv(z).split(d, dim=-1)
        q = q.view(b, t, h, d // h).transpose(1, 2)
        k = k.view(b, t, h, d // h).transpose(1, 2)
        v = v.view(b, t, h, d // h).transpose(1, 2)
        q = _rotate(q, cos, sin, self.rope_dims)
        k = _rotate(k, cos, sin, self.rope_dims)
        if self.span is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            i = torch.arange(t, device=x.device)
            dist = i[:, None] - i[None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(dist >= 0) & (dist < self.span))
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ByteLM(nn.Module):
    """Byte-level causal LM: (B, T) int64 byte values -> (B, T, 256) next-byte logits."""

    def __init__(self, vocab=256, n_layers=3, d_model=128, n_heads=4, rope_dims=16, mlp_mult=4,
                 rope_base=10000.0, conv=0):
        super().__init__()
        self.config = dict(vocab=vocab, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                           rope_dims=rope_dims, mlp_mult=mlp_mult, rope_base=float(rope_base))
        if conv:
            self.config["conv"] = conv
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, rope_dims, mlp_mult, conv) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # small normal start; layers that write into the residual stream start smaller still
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out.weight", "down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids):
        c = self.config
        cos, sin = _rope_tables(ids.shape[1], c["rope_dims"], c["rope_base"], ids.device, self.embed.weight.dtype)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


@contextlib.contextmanager
def attention_span(model: ByteLM, span: int | None):
    """Within the block, every layer sees only the last `span` keys (itself included)."""
    old = [blk.span for blk in model.blocks]
    for blk in model.blocks:
        blk.span = span
    try:
        yield model
    finally:
        for blk, s in zip(model.blocks, old):
            blk.span = s


def save(model: ByteLM, path=DEFAULT, dtype=torch.float16):
    """Write {"config", "state_dict"} with weights stored as `dtype` (fp16 keeps the file small)."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    torch.save({"config": dict(model.config), "state_dict": state}, path)


def load(path=DEFAULT) -> ByteLM:
    """Read a checkpoint written by `save` with weights_only=True; returns the fp32 model in eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = ByteLM(**ckpt["config"])
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    return model.eval()


@torch.no_grad()
def byte_losses(model: ByteLM, data, length: int, max_windows: int | None = None) -> torch.Tensor:
    """(windows, length) next-byte losses in bits over consecutive, non-overlapping windows of `data`.

    `data` is a 1-D uint8 tensor (or bytes); window w holds bytes w·length … w·length + length
    as input and the byte after each as target. At most `max_windows` windows, from the start.
    """
    if isinstance(data, (bytes, bytearray)):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n = (len(data) - 1) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"data of {len(data)} bytes holds no window of {length} + 1")
    rows = []
    for w in range(n):
        chunk = data[w * length: w * length + length + 1].long()
        logits = model(chunk[None, :-1])[0]
        rows.append(F.cross_entropy(logits.float(), chunk[1:], reduction="none") / math.log(2))
    return torch.stack(rows)


def bits_per_char(model: ByteLM, data, length: int, max_windows: int | None = None,
                  from_pos: int = 0) -> float:
    """Mean next-byte cross-entropy in bits per byte (= per character for ASCII text) of `data`,
    read in windows of `length` (see byte_losses), scored on the predictions at positions
    `from_pos` … `length - 1` of each window (0 scores all; a larger value scores only the
    predictions that had at least that much context)."""
    return byte_losses(model, data, length, max_windows)[:, from_pos:].mean().item()


def main(argv=None):
    """Print the numbers benchmarks/RESULTS.md reports: validation bits/char per length and the
    recall probe per distance, with full attention and with attention cut to `--span` keys."""
    import argparse
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import data as D

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--path", default=str(DEFAULT))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--eval-bytes", type=int, default=16 * 16384,
                    help="validation bytes scored at every length (the same text for each)")
    ap.add_argument("--distances", type=int, nargs="*", default=[1000, 3000, 7000])
    ap.add_argument("--probes", type=int, default=60)
    ap.add_argument("--span", type=int, default=256)
    ap.add_argument("--span-bits", action="store_true",
                    help="also score every length with attention cut to --span keys")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    model = load(args.path)
    _, val = D.corpus()
    print(f"validation stream {len(val):,} bytes; scoring the first {args.eval_bytes:,} (+1) at each length")
    head = "| length | windows | bits/char, all positions | bits/char, last 1024 positions of each window |"
    if args.span_bits:
        head += f" same, {args.span}-key span: all | last 1024 |"
    print(head + " s |")
    print("|---" * (head.count("|") - 1 + 1) + "|")
    for length in args.lengths:
        t = time.time()
        n = args.eval_bytes // length
        cols = []
        for span in ([None, args.span] if args.span_bits else [None]):
            with attention_span(model, span):
                losses = byte_losses(model, val, length, max_windows=n)
            cols += [losses.mean().item(), losses[:, max(0, length - 1024):].mean().item()]
        print(f"| {length} | {n} | " + " | ".join(f"{c:.3f}" for c in cols) + f" | {time.time() - t:.0f} |",
              flush=True)
    if not args.distances:
        return
    print(f"\n| distance (bytes) | probes | char acc | all 6 right | char acc, {args.span}-key span "
          f"| all 6 right, {args.span}-key span | s |")
    print("|---|---|---|---|---|---|---|")
    for distance in args.distances:
        t = time.time()
        probes = D.probe_set(val, distance, args.probes)
        full = D.probe_accuracy(model, probes)
        with attention_span(model, args.span):
            cut = D.probe_accuracy(model, probes)
        print(f"| {full['distance_min']}–{full['distance_max']} | {full['n']} | {full['char_acc']:.3f} | "
              f"{full['exact']:.3f} | {cut['char_acc']:.3f} | {cut['exact']:.3f} | {time.time() - t:.0f} |",
              flush=True)
    print(f"\nchance: char acc {1 / len(D.ALPHABET):.3f}, all 6 right {len(D.ALPHABET) ** -D.VALUE_LEN:.1e}")


if __name__ == "__main__":
    main()
