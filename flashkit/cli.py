"""The `flashkit` command: `flashkit info` and `flashkit bench` (also `python -m flashkit ...`).

    flashkit info                    versions, CPU, SIMD sets, threads, GPUs
    flashkit info --json             the same as a JSON object
    flashkit bench                   a small CPU sweep with a progress bar, then a table
    flashkit bench --N 256 1024 --causal both --html report.html --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

BENCH_DEFAULTS = dict(N=[128, 256, 512], d=[64], heads=[4], dtype=["float32"], repeats=3, warmup=1, batch=1)


def _join(values) -> str:
    return " ".join(map(str, values))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from flashkit.measure.sweep import DTYPES

    parser = argparse.ArgumentParser(prog="flashkit", description="Learn, see and measure FlashAttention.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser("info", help="versions, CPU, SIMD instruction sets, threads and GPUs",
                          description="What this machine offers flashkit: versions, CPU model, the SIMD "
                                      "sets Numba/LLVM targets, threads and GPUs.")
    info.add_argument("--json", action="store_true", help="print the raw flashkit.info() dict as JSON")
    info.set_defaults(run=cmd_info, subparser=info)

    bench = sub.add_parser(
        "bench", help="time attention backends over a small sweep and print a table",
        description="Time flashkit.attention for every combination of the options below (after "
                    "--warmup untimed calls, samples for --seconds-per-point, at least --repeats; the "
                    "fastest is reported with the 75th percentile beside it), print a table, and "
                    "optionally write the "
                    "raw results (--json, --csv) and a self-contained HTML report (--html).",
        epilog="Backends: " + _backend_help())
    bench.add_argument("--backends", nargs="+", metavar="NAME",
                       help="backends to time (default: the available CPU baselines; GPU backends get "
                            "CuPy arrays and are timed with CUDA events)")
    bench.add_argument("--N", nargs="+", type=_positive_int, default=BENCH_DEFAULTS["N"], metavar="N",
                       help=f"sequence lengths (default: {_join(BENCH_DEFAULTS['N'])})")
    bench.add_argument("--d", nargs="+", type=_positive_int, default=BENCH_DEFAULTS["d"], metavar="D",
                       help=f"head sizes (default: {_join(BENCH_DEFAULTS['d'])})")
    bench.add_argument("--heads", nargs="+", type=_positive_int, default=BENCH_DEFAULTS["heads"], metavar="H",
                       help=f"numbers of heads (default: {_join(BENCH_DEFAULTS['heads'])})")
    bench.add_argument("--batch", type=_positive_int, default=BENCH_DEFAULTS["batch"], metavar="B",
                       help="batch size (default: %(default)s)")
    bench.add_argument("--causal", choices=("off", "on", "both"), default="off",
                       help="causal masking (default: %(default)s)")
    bench.add_argument("--dtype", nargs="+", choices=DTYPES, default=BENCH_DEFAULTS["dtype"],
                       help=f"input dtypes (default: {_join(BENCH_DEFAULTS['dtype'])})")
    bench.add_argument("--threads", nargs="+", type=_positive_int, metavar="T",
                       help="thread counts for Numba and BLAS (default: leave as is)")
    bench.add_argument("--repeats", type=_positive_int, default=BENCH_DEFAULTS["repeats"],
                       help="the fewest timed samples per point (default: %(default)s)")
    bench.add_argument("--seconds-per-point", type=float, default=0.2, metavar="S",
                       help="seconds of timing per point: more samples while they last (default: %(default)s)")
    bench.add_argument("--warmup", type=_nonneg_int, default=BENCH_DEFAULTS["warmup"],
                       help="untimed calls first, e.g. for Numba's compile (default: %(default)s)")
    bench.add_argument("--json", metavar="FILE", help="write the raw results and machine info as JSON")
    bench.add_argument("--csv", metavar="FILE", help="write the results as CSV")
    bench.add_argument("--html", metavar="FILE", help="write a self-contained plotly report (works offline)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(run=cmd_bench, subparser=bench)
    return parser


def _backend_help() -> str:
    from flashkit.registry import all_backends

    return ", ".join(b.name + ("" if b.available else " (unavailable)") for b in all_backends())


def cmd_info(args, parser: argparse.ArgumentParser) -> int:
    import flashkit
    from flashkit.sysinfo import format_info

    data = flashkit.info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def cmd_bench(args, parser: argparse.ArgumentParser) -> int:
    from tqdm import tqdm

    from flashkit.measure import export
    from flashkit.measure.sweep import Sweep, sweep
    from flashkit.measure.timing import NOISY_SPREAD

    outputs = {kind: getattr(args, kind) for kind in ("json", "csv", "html") if getattr(args, kind)}
    for kind, path in outputs.items():  # fail before the sweep, not after it
        folder = Path(path).parent
        if not folder.is_dir():
            parser.error(f"argument --{kind}: folder {str(folder)!r} does not exist")
    if "html" in outputs:
        from flashkit.viz.dashboard import report_html  # plotly: fail now if it is missing, not after the sweep
    try:
        spec = Sweep(backends=args.backends, N=args.N, d=args.d, heads=args.heads, batch=args.batch,
                            causal={"off": [False], "on": [True], "both": [False, True]}[args.causal],
                            dtype=args.dtype, threads=args.threads or [None], repeats=args.repeats,
                            warmup=args.warmup, seconds_per_point=args.seconds_per_point)
    except ValueError as exc:
        parser.error(str(exc))

    slowed = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    if slowed and not args.quiet:
        print(f"note: {' and '.join(slowed)} set in the environment; NumPy's BLAS may be slower than it "
              f"can be (unset them for benchmark figures)", file=sys.stderr)
    meta = export.metadata(spec)
    rows = []
    with tqdm(total=len(spec), desc="flashkit bench", unit="point", disable=args.quiet, file=sys.stderr) as bar:
        for row in sweep(spec):
            rows.append(row)
            bar.set_postfix_str(f"{row['backend']} N={row['N']}")
            bar.update()
    print(export.format_table(rows))
    machines = " and ".join(sorted({r["machine"] for r in rows}))
    print(f"\n{machines}, commit {meta['commit']}; the fastest sample (ms per call) of at least {spec.repeats} "
          f"taken over about {spec.seconds_per_point:g} s per point, after {spec.warmup} warm-up call(s); "
          f"p75 beside it, '!' where it is more than {1 + NOISY_SPREAD:g}x the fastest")
    load, cores = meta["load_average"], os.cpu_count() or 1
    if load and load[0] > cores:
        print(f"note: load average {load[0]:.2f} on {cores} cores: other work shared the cores, times are noisy")

    if "json" in outputs:
        print(f"wrote {export.write_json(rows, outputs['json'], meta)}")
    if "csv" in outputs:
        print(f"wrote {export.write_csv(rows, outputs['csv'], meta)}")
    if "html" in outputs:
        print(f"wrote {export.write_atomic(outputs['html'], report_html(rows, meta))}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with argv (default sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # The subcommand's own parser, so its errors read "flashkit bench: error: ..." with its usage.
        return args.run(args, args.subparser)
    except BrokenPipeError:  # `flashkit info | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
