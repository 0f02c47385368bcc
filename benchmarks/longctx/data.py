"""Corpus and long-range recall probe for the long-context byte LM (model.py).

Corpus. Every `*.py`, `*.txt` and `*.rst` file under this machine's standard library
(`sysconfig.get_paths()["stdlib"]`, skipping `site-packages` and `__pycache__`), read as raw
bytes. The sorted path list is shuffled with a fixed seed and split by file: 5 % of the files
are validation, the rest training; each split is the concatenation of its files in that shuffled
order, each file followed by one blank line. Nothing is downloaded. The corpus depends on the
Python that is installed (the committed model was trained on CPython 3.11.7's library; see
benchmarks/RESULTS.md), so the numbers are reproducible on the same Python.

Recall probe. A line `key_37 = "x9qk2w"` (a two-digit name, a value of six characters drawn
from a-z0-9) is planted near the start of a stretch of real text, and far later a line
`print(key_37)  # x9qk2w` is planted. Nothing in the text predicts the value, so a model can
only get the six value characters after `# ` right by looking back at the assignment: with
the assignment out of its attention span, the best it can do is guess (1/36 per character).
Several pairs are assigned together and only one is recalled, so the model has to match the
name as well. Training mixes the same kind of planted lines into a fraction of its sequences
(train.py), since nothing in plain text teaches the task, and starts with pure copy rows
(copy_rows) that teach the copying the recall is built on.
"""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import torch

SEED = 1234
VAL_FRACTION = 0.05
SUFFIXES = (".py", ".txt", ".rst")
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
VALUE_LEN = 6


def source_files(root: str | Path | None = None) -> list[Path]:
    """The corpus files under `root` (default: the running Python's stdlib), sorted by path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*")
             if p.suffix in SUFFIXES and p.is_file()
             and "site-packages" not in p.parts and "__pycache__" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, validation): a seeded shuffle of the sorted list, the first 5 % for validation."""
    order = list(files)
    random.Random(SEED).shuffle(order)
    n_val = max(1, round(VAL_FRACTION * len(order)))
    return order[n_val:], order[:n_val]


def _join(files: list[Path]) -> torch.Tensor:
    buf = bytearray()
    for p in files:
        buf += p.read_bytes()
        buf += b"\n\n"
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


def corpus(root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte streams as 1-D uint8 tensors."""
    train, val = split_files(source_files(root))
    return _join(train), _join(val)


def assignment(name: int, value: str) -> bytes:
    return f'key_{name:02d} = "{value}"\n'.encode()


def recall_prefix(name: int) -> bytes:
    """The recall line up to (not including) the value."""
    return f"print(key_{name:02d})  # ".encode()


def random_pairs(rng: random.Random, n: int) -> list[tuple[int, str]]:
    """`n` (name, value) pairs with distinct names from 0-99 and random six-character values."""
    names = rng.sample(range(100), n)
    return [(name, "".join(rng.choice(ALPHABET) for _ in range(VALUE_LEN))) for name in names]


def _line_start(text: bytes, pos: int) -> int:
    """The first position at or after `pos` that starts a line (len(text) if none)."""
    j = text.find(b"\n", max(pos - 1, 0))
    return len(text) if j < 0 else j + 1


def plant(text: bytes, pairs: list[tuple[int, str]], recalls: list[tuple[int, int]]):
    """Insert the assignment lines and the recall lines into `text`.

    The assignment lines for every pair go in as one block at the first line start of `text`;
    each recall (pair index, offset into `text`) goes in at the first line start at or after
    that offset. Returns (bytes, [(position of the value's first character in the result,
    value, distance from the assigned value to the recalled value)]).
    """
    cut = _line_start(text, 0)
    inserts = [(cut, 0, b"".join(assignment(n, v) for n, v in pairs), None)]
    for order, (idx, offset) in enumerate(recalls):
        name, value = pairs[idx]
        at = max(_line_start(text, offset), cut)
        inserts.append((at, 1 + order, recall_prefix(name) + value.encode() + b"\n", idx))
    inserts.sort(key=lambda t: (t[0], t[1]))
    out, prev, assigned, targets = bytearray(), 0, {}, []
    for at, _, line, idx in inserts:
        out += text[prev:at]
        prev = at
        if idx is None:                      # the assignment block: remember where each value starts
            for i, (n, v) in enumerate(pairs):
                start = len(out) + len(assignment(n, v)) - VALUE_LEN - 2
                assigned[i] = start
                out += assignment(n, v)
        else:
            start = len(out) + len(line) - VALUE_LEN - 1
            targets.append((start, pairs[idx][1], start - assigned[idx]))
            out += line
    out += text[prev:]
    return bytes(out), targets


def copy_rows(rng: random.Random, batch: int, length: int) -> torch.Tensor:
    """(batch, length) int64 rows of random characters (a-z0-9), each holding one string of
    5-12 characters twice: near the start and at a random later place.

    Training starts with these (train.py `--steps-copy`) because nothing but copying lowers
    their loss: the model learns to find the earlier occurrence and continue it (an
    induction head) in a few minutes, which plain text plus the planted lines did not teach
    a model this size in an hour (benchmarks/RESULTS.md)."""
    codes = [ord(c) for c in ALPHABET]
    rows = []
    for _ in range(batch):
        n = rng.randint(5, 12)
        piece = [rng.choice(codes) for _ in range(n)]
        first = rng.randrange(0, length // 8 + 1)
        second = rng.randrange(first + n, length - n + 1)
        row = [rng.choice(codes) for _ in range(length)]
        row[first:first + n] = piece
        row[second:second + n] = piece
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def plant_repeats(text: bytes, rng: random.Random, copies: tuple[int, int] = (2, 4),
                  size: tuple[int, int] = (10, 60)) -> bytes:
    """Insert one random string of `size` characters (a-z0-9), as a line of its own, at
    `copies` random line starts of `text`. Training mixes these in (train.py `--repeat`): every
    copy after the first can be predicted only by finding the earlier one, which is the copying
    (induction) skill the recall probe needs, with far more characters to learn it from."""
    line = ("".join(rng.choice(ALPHABET) for _ in range(rng.randint(*size))) + "\n").encode()
    starts = sorted(_line_start(text, rng.randrange(len(text))) for _ in range(rng.randint(*copies)))
    out, prev = bytearray(), 0
    for at in starts:
        out += text[prev:at] + line
        prev = at
    return bytes(out + text[prev:])


def probe_set(val: torch.Tensor, distance: int, count: int, n_pairs: int = 4, seed: int = 0):
    """`count` probe sequences whose recalled value lies about `distance` bytes after its assignment.

    Each uses a different stretch of the validation stream (evenly spaced, deterministic) and
    its own pairs from `seed`. Returns [(ids (1-D int64), value start, value, exact distance)];
    each sequence ends 64 bytes after its recall line.
    """
    rng = random.Random(seed * 1_000_003 + distance)
    raw = bytes(val.numpy())
    span = distance + 400
    stride = max(1, (len(raw) - span) // count)
    out = []
    for i in range(count):
        text = raw[i * stride: i * stride + span]
        pairs = random_pairs(rng, n_pairs)
        first = _line_start(text, 0)
        block = sum(len(assignment(n, v)) for n, v in pairs)
        # the recalled value sits at about text offset + block + len(prefix); aim it at `distance`
        offset = first + distance - block - len(recall_prefix(0))
        seq, targets = plant(text, pairs, [(rng.randrange(n_pairs), offset)])
        start, value, dist = targets[0]
        seq = seq[: start + VALUE_LEN + 64]
        out.append((torch.tensor(list(seq), dtype=torch.long), start, value, dist))
    return out


@torch.no_grad()
def probe_accuracy(model, probes) -> dict:
    """Greedy recall scores: per-character accuracy and the share of values got entirely right.

    The value is teacher-forced, so a probe counts as right exactly when greedy decoding after
    `# ` would write all six characters of the value.
    """
    chars = exact = 0
    dists = []
    for ids, start, value, dist in probes:
        logits = model(ids[None, :start + VALUE_LEN])[0]
        pred = logits[start - 1: start - 1 + VALUE_LEN].argmax(-1)
        hits = (pred == ids[start: start + VALUE_LEN]).sum().item()
        chars += hits
        exact += hits == VALUE_LEN
        dists.append(dist)
    n = len(probes)
    return {"char_acc": chars / (n * VALUE_LEN), "exact": exact / n, "n": n,
            "distance_min": min(dists), "distance_max": max(dists)}
