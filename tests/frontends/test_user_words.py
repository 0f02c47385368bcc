"""Errors speak the caller's language: Python keywords from the API and the compile backend, flags from the CLI."""
from __future__ import annotations

import re

import pytest
import torch

import attnrewrite
from attnrewrite.cli import main
from attnrewrite.io import InputError
from _models import NoAttention, TinyAttention

FLAG = re.compile(r"--[a-z]")                          # any command-line flag


def message(call) -> str:
    with pytest.raises(InputError) as e:
        call()
    return str(e.value)


def tiny_program():
    torch.manual_seed(0)
    return torch.export.export(TinyAttention().eval(), (torch.randn(2, 5, 16),))


def test_api_and_backend_errors_name_python_keywords():
    for text in (message(lambda: attnrewrite.compile_backend("sparse", auto=True)),
                 message(lambda: attnrewrite.rewrite(tiny_program(), "sparse", auto=True))):
        assert text.startswith("auto=True needs tolerance=T") and not FLAG.search(text), text
    text = message(lambda: attnrewrite.rewrite(NoAttention().eval(), "exact", example_inputs=(torch.randn(2, 16),)))
    assert text.startswith("no attention found") and not FLAG.search(text), text
    text = message(lambda: attnrewrite.compile_backend("conv-basis", k=float("inf")))
    assert not FLAG.search(text), text


def test_the_cli_keeps_its_flags(tmp_path, capsys):
    path = tmp_path / "tiny.pt2"
    torch.export.save(tiny_program(), path)
    assert main([str(path), "--variant", "sparse", "--set", "auto=true"]) == 2
    assert "--set auto=true needs --tolerance T" in capsys.readouterr().err
    none = tmp_path / "none.pt2"
    torch.export.save(torch.export.export(NoAttention().eval(), (torch.randn(2, 16),)), none)
    assert main([str(none), "--variant", "exact"]) == 2
    assert "run with --list --verbose" in capsys.readouterr().err
