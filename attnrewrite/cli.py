"""The `attnrewrite` command: list attention sites, rewrite them, check, write.

    attnrewrite MODEL --list [--verbose] [--json]
    attnrewrite MODEL --variant exact [-o OUT] [--inputs FILE] [--sites SEL] [--json] ...
    attnrewrite                       # the built-in demo: pretrained all-MiniLM-L6-v2

stdout carries only the table (or only JSON with --json); progress and warnings go to
stderr. Exit codes: 0 done, 1 the check failed the tolerance, 2 bad input or usage,
3 an internal error (a bug: rerun with --verbose for the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from . import kernels, pipeline
from .frontends.export import import_modules, read_inputs
from .frontends.onnx import OnnxFrontEnd, external_files
from .io import InputError, atomic_write, check_writable
from .report import plot, render_table
from .variants import VARIANTS


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):              # one line, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnrewrite", description="Find every attention in a model and rewrite it.")
    p.add_argument("model", nargs="?", help=".pt2, .onnx, .pt/.pth, or pkg.module:factory; none = built-in demo")
    p.add_argument("--list", action="store_true", help="list detected sites, rewrite nothing")
    p.add_argument("--variant", choices=sorted(v.replace("_", "-") for v in VARIANTS))
    p.add_argument("-o", "--output", help="output file (default <stem>.<variant>.pt2 beside the input)")
    p.add_argument("--inputs", help="inputs file (torch.save of {'args','kwargs'}, a tuple, or a list of dicts; .npz for ONNX)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="variant parameter, for every selected site")
    p.add_argument("--sites", help="site ids, names, globs or ranges (0-3), comma-separated")
    p.add_argument("--tolerance", type=float, help="end-to-end rel_err gate")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="fit a per-head output map per site on N calibration input sets (disjoint from the "
                        "check's: the first N of --inputs, else N synthesised)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of each site's cost before/after beside its error")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--no-check", action="store_true", help="skip the numeric check")
    p.add_argument("--force", action="store_true", help="write the output even if the check fails")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--trust", action="store_true", help="allow loading a pickled module (runs its code)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (a library registering custom ops or pytree types the model uses)")
    p.add_argument("--emit-kernels", metavar="DIR", help="write the generated Triton source each rewritten site runs with")
    p.add_argument("--target", choices=("sm_80", "sm_90"), help="with --emit-kernels: also write each kernel's PTX for this GPU")
    p.add_argument("--verbose", action="store_true", help="library logs, unmatched softmaxes, tracebacks")
    return p


def parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"--set expects KEY=VALUE, got '{pair}'")
        out[key.strip()] = parse_value(value.strip())
    return out


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch", "torch._dynamo", "torch.export", "torch._export", "transformers", "onnx",
                 "onnxscript", "onnxruntime", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def output_path(args, fe, variant: str | None) -> Path | None:
    """-o, else the front end's default beside the input; refuses to overwrite the input or an existing file."""
    if variant is None:
        return None
    output = Path(args.output) if args.output else fe.output_path(variant)
    if output is None:
        return None
    source = getattr(fe, "source", None)
    if source and os.path.exists(source):
        src = Path(source)
        protected = {src.resolve(), *(external_files(src) if isinstance(fe, OnnxFrontEnd) else ())}
        if output.resolve() in protected or output.with_name(output.name + ".data").resolve() in protected:
            raise InputError(f"{output} would overwrite the input model or its weights: choose another -o")
    if output.exists() and not args.overwrite:
        raise InputError(f"{output} exists (pass --overwrite to replace it)")
    check_writable(output)
    return output


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _quiet(args.verbose)
    err = Console(stderr=True)
    out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)

    variant = args.variant.replace("-", "_") if args.variant else None
    listing = args.list or variant is None
    options = parse_options(args.options)
    if listing and (options or args.output or args.calibrate):
        raise UsageError("--set, -o and --calibrate need --variant")
    if args.calibrate < 0:
        raise UsageError("--calibrate N needs N ≥ 0")
    if (args.emit_kernels or args.target) and listing:
        raise UsageError("--emit-kernels and --target need --variant")
    if args.target and not args.emit_kernels:
        raise UsageError("--target needs --emit-kernels DIR")
    if args.target and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise UsageError("--target compiles for a GPU: run it without TRITON_INTERPRET=1")
    if variant:
        pipeline.validate_options(variant, options, args.tolerance)
    if args.output and Path(args.output).exists() and not args.overwrite and not listing:
        raise InputError(f"{args.output} exists (pass --overwrite to replace it)")

    import_modules(args.imports)
    t0 = time.perf_counter()
    with err.status("loading the model…"):
        is_onnx = bool(args.model) and args.model.lower().endswith(".onnx")
        inputs = args.inputs if is_onnx else (read_inputs(args.inputs) if args.inputs else None)
        fe = pipeline.open_model(args.model, inputs, trust=args.trust)
    timings = {"load_s": time.perf_counter() - t0}

    if listing:
        report, unmatched = pipeline.listing(fe, timings=timings)
        return finish_listing(report, unmatched, args, out, err)

    output = output_path(args, fe, variant)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"rewriting into {variant}", total=None)

        def progress(stage: str, done: int, total: int | None) -> None:
            bar.update(task, description=f"{variant}: {stage}", completed=done, total=total)

        result = pipeline.rewrite(fe, variant, options, sites=args.sites, check=not args.no_check,
                                  tolerance=args.tolerance, timings=timings, calibrate=args.calibrate,
                                  progress=progress)
    if args.emit_kernels:
        arch = int(args.target[3:]) if args.target else None
        written = kernels.emit(args.emit_kernels, result.report["sites"], arch)
        err.print(f"wrote {len(written)} kernel file(s) to {args.emit_kernels}")
    return finish_rewrite(result.report, output, lambda path: fe.save(result.program, path), args, out, err)


def finish_rewrite(report: dict, output, save, args, out, err) -> int:
    """Write the output (unless the check failed and no --force), print and write the report; exit code."""
    passed = report.get("check", {}).get("passed")
    write = output is not None and (passed is not False or args.force)
    if write:
        save(output)
        report["output"] = str(output)
    _emit(report, args, out)
    if args.report:
        _write_report(Path(args.report), report)
    if args.plot:
        atomic_write(Path(args.plot), lambda tmp: plot(report, tmp))
    if passed is False:
        err.print("check failed: " + ("written anyway (--force)" if write else "nothing written (--force writes it)"))
        return 1
    if write:
        err.print(f"wrote {output}")
    return 0


def finish_listing(report: dict, unmatched: list, args, out, err) -> int:
    """Print (and write) a --list report; with --verbose, why each other softmax is not attention."""
    if args.verbose:
        report["unmatched"] = [{"node": n, "reason": r} for n, r in unmatched]
    _emit(report, args, out)
    if args.verbose and not args.json:
        for n, r in unmatched:
            out.print(f"  not attention: {n}: {r}")
    if not args.list:
        err.print("hint: pass --variant {exact,…} to rewrite these sites")
    if args.report:
        _write_report(Path(args.report), report)
    if args.plot:
        atomic_write(Path(args.plot), lambda tmp: plot(report, tmp))
    return 0


def _emit(report, args, out):
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render_table(report, out)


def _write_report(path: Path, report: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    try:
        return run(argv)
    except UsageError as e:
        print(f"attnrewrite: usage error: {e} (see attnrewrite --help)", file=sys.stderr)
        return 2
    except BrokenPipeError:                # stdout closed early (| head): not an error
        return 0
    except KeyboardInterrupt:
        print("attnrewrite: interrupted", file=sys.stderr)
        return 130
    except InputError as e:
        print(f"attnrewrite: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        if verbose:
            traceback.print_exc()
        first = (str(e).splitlines() or [""])[0]
        print(f"attnrewrite: internal error: {type(e).__name__}: {first} (rerun with --verbose for details)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
