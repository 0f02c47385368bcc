"""benchmarks/long_context.py at its smallest: the shipped byte-level LM at 256 tokens.

The exact rewrite's bits/char is the model's own (computed here without any compile), and a
window that covers every key (window 256 at 256 tokens) is the exact limit: the same bits/char.
A window of 16 keys is not: it costs bits.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import long_context as LC  # noqa: E402

LC.SETTINGS["window 16"] = ("sparse", {"mode": "window", "window": 16})


@pytest.fixture(scope="module")
def rows():
    torch.set_num_threads(1)
    return {r["setting"]: r for r in LC.main(["--lengths", "256", "--settings", "exact", "window 256", "window 16",
                                              "--probes", "1", "--windows", "1", "--rounds", "1"])}


def test_exact_is_the_models_own_bits_per_char(rows):
    model = LC.M.load()
    _, val = LC.D.corpus()
    own = LC.M.bits_per_char(model, val, 256, max_windows=1)
    assert rows["exact"]["bits_per_char"] == pytest.approx(own, abs=1e-4)
    assert own < 4.0                                          # the model learned something (8 = uniform)
    assert rows["exact"]["rewritten"] == rows["exact"]["sites"] == model.config["n_layers"]


def test_window_over_every_key_is_exact_and_a_short_one_is_not(rows):
    assert abs(rows["window 256"]["d_bits"]) < 1e-4
    assert rows["window 16"]["d_bits"] > 0.01
