"""Shared test set-up.

The tests are split by layer (passes, variants, kernels, frontends) plus `models` (real
transformers families, torch.nn modules, real-world graphs and their ONNX exports). The
helpers in this folder (`_models`, `_kernels_interp`) and the modules some tests borrow
cases from (`test_hf_models`, `test_spellings`, `test_sparse`, `test_onnx_variants`, ...)
are imported by plain name, so this folder and every layer folder go on sys.path.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYERS = ("passes", "variants", "kernels", "frontends", "models")

for _path in (HERE, *(HERE / name for name in LAYERS)):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import pytest  # noqa: E402

MODELS = HERE / "models"

# The slowest tests outside tests/models/, by function (every parametrization), with what a
# full run on the 2-core CPU machine (other jobs running) measured for all of them together.
# The first group: ~320 s of the layer folders' ~420 s. `make test-fast` skips them, `make test` runs them.
SLOW = {
    "frontends/test_backend.py::test_hf_families_through_backend_match_export": "78 s, transformers families",
    "kernels/test_kernels_aot.py::test_compiles_without_spills_within_shared_memory": "52 s, ptxas per kernel",
    "kernels/test_kernels.py::test_kernel_matches_reference": "35 s, the Triton-interpreter subprocess",
    "variants/test_onnx_variants.py::test_lowering": "23 s, exports and ORT sessions",
    "frontends/test_ddp.py::test_ddp_two_ranks_end_identical_and_trained": "22 s, two processes",
    "frontends/test_shapes_dtypes.py::test_symbolic_batch_and_length_survive_the_rewrite": "19 s",
    "frontends/test_cli.py::test_console_script_demo_lists_pretrained_minilm": "16 s, pretrained MiniLM",
    "variants/test_conv_basis.py::test_minilm_rewrite_end_to_end_k_n_and_diagnostics": "15 s, pretrained MiniLM",
    "variants/test_conv_basis.py::test_minilm_k_equal_n_is_exact_and_error_falls_with_k": "14 s, pretrained MiniLM",
    "variants/test_onnx_conv_basis.py::test_exported": "12 s, exports",
    "frontends/test_backend.py::test_training_through_backend_matches_rewritten_program": "9 s",
    "variants/test_sparse.py::test_no_n_by_n_tensor": "7 s",
    "variants/test_preconditioned.py::test_hf_rewrite_report_save_load_and_train": "7 s, transformers",
    "frontends/test_bad_inputs.py::test_missing_custom_op_or_pytree_type_is_named_and_import_fixes_it":
        "4 s, a subprocess",
    "variants/test_sparse.py::test_end_to_end_auto_picks_the_cheapest_k_within_tolerance": "3 s, transformers",
    "variants/test_sparse.py::test_end_to_end_exact_limit": "3 s, transformers",
    # Measured in a `-m "not slow"` run (load average 4-5 on the 2 cores, so about twice as long
    # as alone): the next slowest, each several seconds of compiling, exporting or searching.
    "frontends/test_backend.py::test_exact_outputs_and_gradients_match_eager_eager_and_inductor": "11 s, inductor",
    "variants/test_onnx_conv_basis.py::test_direct": "9 s, ORT sessions",
    "variants/test_sparse.py::test_auto_tune_with_global_budget": "7 s",
    "variants/test_conv_basis.py::test_float32_fast_path_k_equal_n_matches_exact": "6 s",
    "variants/test_sparse.py::test_no_n_by_n_tensor_new_paths": "5 s",
    "variants/test_onnx_conv_basis_dft.py::test_matches_reference": "5 s, ORT sessions",
    "frontends/test_calibrate.py::test_compile_backend_calibrates_on_inputs_drawn_like_the_example": "4 s",
    "variants/test_sparse.py::test_end_to_end_small_k_saves_and_loads": "4 s",
    "variants/test_onnx_conv_basis_dft.py::test_dynamo_causal_export_has_no_square_tensor": "3 s, dynamo export",
    "variants/test_conv_basis.py::test_fast_path_memory_is_o_k_n_d": "3 s",
    "frontends/test_backend.py::test_graph_breaks_recompiles_and_dynamic_lengths_keep_every_site": "3 s, compiles",
    "variants/test_onnx_speed_lowerings.py::test_exact_causal_without_padding_has_no_isnan": "2 s",
}


def pytest_collection_modifyitems(config, items):
    """Everything under tests/models/ is slow (real architectures, exported and run end to end),
    and so is each test named in SLOW."""
    for item in items:
        path = Path(str(item.path)).resolve()
        function = item.nodeid.split("[", 1)[0].rsplit("::", 1)[-1]
        key = f"{path.relative_to(HERE).as_posix()}::{function}" if HERE in path.parents else None
        if MODELS in path.parents or key in SLOW:
            item.add_marker(pytest.mark.slow)

