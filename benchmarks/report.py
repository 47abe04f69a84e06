"""Write the README's generated sections from the code and the committed results files.

    python -m benchmarks.report          # rewrite README.md between the <!-- NAME:begin/end --> markers
    python -m benchmarks.report --check  # exit 1 if README.md is out of date (a test runs this)

Numbers in the README are never typed: they come from benchmarks/results/*.json, which the benchmark
scripts write together with the machine, versions and commit they were measured on.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from flashkit.atomic import write_text
from flashkit.measure.gpu_results import kind_of

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def backends_table() -> str:
    from flashkit import registry

    rows = ["| backend | device | rung | dtypes | head size d | custom mask | score_mod / mask_mod | backward | "
            "split-K decode | what it is |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in registry.all_backends():
        dims = "any" if b.head_dims is None else ", ".join(map(str, b.head_dims))
        rung = "" if b.rung is None else str(b.rung)
        rows.append(f"| `{b.name}` | {b.device} | {rung} | {', '.join(b.dtypes)} | {dims} | "
                    f"{'yes' if b.mask else 'no'} | {_mods(b)} | {'yes' if b.has_backward else 'no'} | "
                    f"{'yes' if b.has_decode else 'no'} | {b.summary} |")
    return "\n".join(rows)


def _mods(b) -> str:
    """Whether a backend takes score_mod / mask_mod: in its forward, and in its backward too."""
    return "forward and backward" if b.mods and b.backward_mods else "forward" if b.mods else "no"


# Results files kept beside the main one as evidence (earlier runs, a different threading layer): not headlines.
VARIANTS = ("-history", "-workqueue")


def _load(pattern: str):
    return [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob(pattern))
            if not any(v in p.name for v in VARIANTS)]


def results_section() -> str:
    """Headline numbers from every results file found, each labelled with where it was measured."""
    parts = []
    for path, data in _load("cpu-*.json"):
        if path.name.startswith("cpu-backward-"):
            parts.append(_cpu_backward_headline(path, data))
        elif data.get("benchmark", "benchmarks/cpu_forward.py") == "benchmarks/cpu_forward.py":  # not cpu-mods-*, cpu-small-*
            parts.append(_cpu_headline(path, data))
    gpu = [(p, d) for p, d in _load("gpu-*.json") if kind_of(p) not in ("session", "ring")]
    forward = [(p, d) for p, d in gpu if kind_of(p) == "forward"]
    backward = [(p, d) for p, d in gpu if kind_of(p) == "backward"]
    if forward:
        parts.append(_gpu_table(forward, "forward"))
    if backward:
        parts.append(_gpu_table(backward, "backward"))
    headline = {"overhead": _gpu_overhead_headline, "mods": _gpu_mods_headline, "input-check": _gpu_input_check_headline}
    for path, data in gpu:
        if kind_of(path) in headline:
            parts.append(headline[kind_of(path)](path, data))
    for path, data in _load("decode-*.json"):
        parts.append(_decode_headline(path, data))
    if not parts:
        return "No results recorded yet: run `make bench` (CPU) or `python -m benchmarks.gpu_session` (GPU)."
    return "\n\n".join(p for p in parts if p)


def _label(path, data) -> str:
    m = data.get("machine") or data.get("cpu_info") or {}
    if isinstance(data.get("gpu"), dict):
        where = f"{data['gpu']['name']}"
    elif "card" in data:
        where = f"{data['card']}, driver {data.get('driver', '?')}, CuPy {data.get('cupy', '?')}, torch {data.get('torch', '?')}"
    elif m:
        where = f"{m.get('cpu', 'CPU')} ({m.get('llvm_cpu', '?')}, {', '.join(m.get('llvm_features', []))}), {m.get('cores', '?')} cores"
    else:
        where = "unknown machine"
    when = str(data.get("date") or data.get("when") or "unknown date")[:10]
    commit = data.get("commit", "unknown")
    commit = str(commit.get("commit") if isinstance(commit, dict) else commit)
    commit = commit[:10] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit
    return f"_{where}; {when}; commit {commit}; file `{path.relative_to(ROOT)}`_"


def _speedup(row) -> str:
    """The speed-up over numpy-standard, or a dash where that run did not time numpy-standard."""
    x = row.get("speedup_vs_numpy_standard")
    return "-" if x is None else f"{x:.2f}"


def _cpu_headline(path, data) -> str:
    """CPU forward at N = 4096 (B=1, H=8, d=64, fp32): the fastest Numba rung beside its peers."""
    fastest = data.get("fastest_numba_rung", "numba-gemm")
    rows = {(r["impl"], r["causal"]): r for r in data["results"] if r["N"] == 4096}
    isa = data.get("isa")
    limited = (f", every side limited to {isa.upper()} code (`benchmarks/cpu_forward.py --isa {isa}`) on this machine"
               if isa else "")
    out = [f"**CPU forward**{limited}, fp32, B=1, H=8, N=4096, d=64, all cores "
           f"(sgemm on the same cores: {data['sgemm']['gflops']:.0f} GFLOP/s)", "",
           "| causal | backend | ms | GFLOP/s | of sgemm | time / torch SDPA | speed-up over numpy-standard |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for causal in (False, True):
        for impl in dict.fromkeys(("numpy-standard", "numba-gemm", fastest, "torch-sdpa")):  # rung 3 beside the top
            r = rows.get((impl, causal))
            if r is not None:
                out.append(f"| {'yes' if causal else 'no'} | {impl} | {r['ms']:.0f} | {r['gflops']:.0f} | "
                           f"{r['pct_sgemm']:.0f}% | {r['time_vs_torch']:.2f} | {_speedup(r)} |")
    mem = {(m["impl"], m["N"]): m for m in data.get("memory", [])}
    std, fast = mem.get(("numpy-standard", 16384)), mem.get(("numba", 16384))
    if std and fast:
        out += ["", f"Extra memory at N=16384: numpy-standard {std['extra_bytes_rss'] / 2**20:,.0f} MiB, "
                    f"numba {fast['extra_bytes_rss'] / 2**20:,.1f} MiB ({fast['pct_of_numpy_standard']:.3f}%)."]
    for run in data.get("long_runs", []):
        if "seconds" in run:
            out.append(f"numba at N={run['N']}{' causal' if run.get('causal') else ''}: {run['seconds']:.1f} s.")
    return "\n".join(out + ["", _label(path, data)])


def _best_calls(data, N=4096):
    """{(dtype, d, causal): (row, public?, fastest torch row, torch flash row)} of one results file: the
    fastest public call of a rung where the file has public rows (what users get), else the fastest rung
    alone; ratios are worked out here from the file's torch rows of the same shape and dtype."""
    rows = [r for r in data["results"] if r.get("N") == N and r.get("status") == "ok"]
    torch, best = {}, {}
    for r in rows:
        if r["impl"].startswith("torch-"):
            torch.setdefault((r["dtype"], r["d"], r["causal"]), {})[r["impl"]] = r
    has_public = any(r.get("public") and r.get("rung") for r in rows)
    for r in rows:
        key = (r["dtype"], r["d"], r["causal"])
        if r["impl"].startswith("torch-") or not r.get("rung") or r.get("rung") == 1:
            continue
        if has_public != bool(r.get("public")):
            continue
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    out = {}
    for key, r in best.items():
        peers = torch.get(key, {})
        fastest = min(peers.values(), key=lambda p: p["ms"]) if peers else None
        out[key] = (r, has_public, fastest, peers.get("torch-flash"))
    return out


def _gpu_table(files, direction) -> str:
    """The GPU forward (or backward) at N = 4096, one column group per card (each results file): the best
    rung through the public call where the file timed it (else the rung alone, marked), its time against
    the fastest torch backend of the same run and against torch flash."""
    per_card = [(path, data, _best_calls(data)) for path, data in files]
    keys = sorted({k for *_, best in per_card for k in best})
    cards = [data["card"].replace("NVIDIA ", "") for _, data, _ in per_card]
    what = "forward" if direction == "forward" else "backward (TFLOP/s counting 2.5x the forward's FLOPs)"
    call = "flashkit.attention" + ("_backward" if direction == "backward" else "")
    head = "| dtype | d | causal | " + " | ".join(f"{c}: rung | ms | TFLOP/s | fastest torch / ours | flash / ours"
                                                 for c in cards) + " |"
    out = [f"**GPU {what}**, B·N=16384, H·d=2048, N=4096: the fastest rung as users call it (`{call}(..., "
           "backend=<rung>)`, validation and NaN/Inf check included), each card beside the other; ratios are "
           "torch's time over ours in the same run (> 1: flashkit faster)", "",
           head, "| --- | --- | --- |" + " --- | --- | --- | --- | --- |" * len(cards)]
    for key in keys:
        cells = []
        for _, _, best in per_card:
            if key not in best:
                cells.append(" | | | | ")
                continue
            r, public, fastest, flash = best[key]
            name = r.get("backend") or r["impl"]
            label = name if public else f"{name} (rung alone)"
            fr = f"{fastest['ms'] / r['ms']:.2f} ({fastest['impl'][len('torch-'):]})" if fastest else ""
            fl = f"{flash['ms'] / r['ms']:.2f}" if flash else ""
            cells.append(f"{label} | {r['ms']:.2f} | {r['tflops']:.0f} | {fr} | {fl}")
        dtype, d, causal = key
        out.append(f"| {dtype} | {d} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |")
    notes = []
    for path, data, best in per_card:
        public = any(v[1] for v in best.values())
        notes.append(_label(path, data) + ("" if public else " (this file timed the rungs alone, not the public call)"))
    return "\n".join(out + [""] + ["", "".join(n + "  \n" for n in notes).rstrip()])


def _gpu_overhead_headline(path, data) -> str:
    """What the public call costs beyond its kernel (benchmarks/gpu_overhead.py): per shape, auto's rung called
    alone and flashkit.attention over it (with each NaN/Inf scan shape, and unchecked); then the pieces."""
    rows = data["results"]
    shaped = [r for r in rows if "auto_rung" in r and "ms" in r]
    out = []
    if shaped:
        out += ["**GPU public call against the rung alone**, B*N=16384, H*d=2048: auto's rung called directly (ms) and "
                "flashkit.attention's time over it, with its NaN/Inf scan (the default) and with check_finite=False; "
                "rung 6 likewise", "",
                "| d | N | causal | dtype | rung | alone (ms) | public | separate scan | unchecked | rung 6 (ms) | rung 6 public |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        cells = {}
        for r in shaped:
            cells.setdefault((r["d"], r["N"], r["causal"], r["dtype"], r["auto_rung"]), {})[r["what"]] = r["ms"]
        # the ratios the benchmark recorded (medians of interleaved rounds' own ratios), else the times' ratio
        recorded = {(r["d"], r["N"], r["causal"], r["dtype"], r["what"]): r["ratio"] for r in data.get("ratios", [])}
        for (d, N, causal, dtype, rung), ms in cells.items():
            a, r6 = ms["auto's rung alone"], ms["rung 6 alone"]

            def over(name, alone):
                if name not in ms:
                    return ""
                got = recorded.get((d, N, causal, dtype, f"{name} / {alone}"))
                return f"{got if got is not None else ms[name] / ms[alone]:.3f}x"

            alone = "auto's rung alone"
            out.append(f"| {d} | {N} | {'yes' if causal else 'no'} | {dtype} | {rung} | {a:.3f} | "
                       f"{over('flashkit.attention', alone)} | {over('flashkit.attention (separate scan)', alone)} | "
                       f"{over('flashkit.attention(check_finite=False)', alone)} | "
                       f"{r6:.3f} | {over('flashkit.attention(backend=cupy-mma-2tile)', 'rung 6 alone')} |")
        out += ["", "Pieces, B=4, N=4096, H=32, d=64, not causal (ms per call)", ""]
    else:
        out += ["**GPU public call against the rung alone**, B=4, N=4096, H=32, d=64, not causal (ms per call)", ""]
    out += ["| dtype | what | ms |", "| --- | --- | --- |"]
    for r in rows:
        if "auto_rung" not in r and "ms" in r:
            out.append(f"| {r['dtype']} | {r['what']} | {r['ms']:.3f} |")
    return "\n".join(out + ["", _label(path, data)])


def _gpu_input_check_headline(path, data) -> str:
    """Rung 7's NaN/Inf check inside its kernel (benchmarks/gpu_input_check.py): per shape and variant, the kernel
    with the check and the public call with it or with the separate scan, over the kernel alone (medians of
    interleaved rounds), and when the answer came."""
    out = ["**GPU NaN/Inf check inside rung 7's kernel**, fp16, B*N=16384, H*d=2048 (time over the kernel alone, "
           "median of interleaved rounds; flashkit.gpu.flash.check_columns picks the fused check where it pays)", "",
           "| d | N | causal | variant | kernel alone (ms) | kernel with the check | public, fused | public, separate scan "
           "| answer / kernel end (ms) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["results"]:
        q = r["ratios"]
        out.append(f"| {r['d']} | {r['N']} | {'yes' if r['causal'] else 'no'} | {r['variant']} | {r['alone_ms']:.3f} | "
                   f"{q['fused']:.3f}x | {q['public']:.3f}x | {q['separate']:.3f}x | "
                   f"{r['answer_ms']:.2f} / {r['end_ms']:.2f} |")
    return "\n".join(out + ["", _label(path, data)])


def _gpu_mods_headline(path, data) -> str:
    """score_mod / mask_mod on rung 6 (benchmarks/gpu_mods_check.py): their cost, and a document mask."""
    s = data["summary"]
    # gpu-mods-backward-*.json (benchmarks/gpu_mods_backward_check.py): the backward rung 2 with the same hooks
    where = "the backward, cupy-bwd-mma" if "backward" in path.name else "cupy-mma-2tile"
    out = [f"**GPU score_mod / mask_mod on {where}**: {s['checks'] - s['failed']} of {s['checks']} checks "
           "against the float64 reference passed. Time with a score_mod / time without (kernel), N=4096, fp16:", "",
           "| d | causal | no mod (ms) | identity | softcap(50) |", "| --- | --- | --- | --- | --- |"]
    for r in data.get("mod_cost", []):
        out.append(f"| {r['d']} | {'yes' if r['causal'] else 'no'} | {r['kernel_none']['min_ms']:.2f} | "
                   f"{r['ratio_kernel_identity']:.2f}x | {r['ratio_kernel_softcap50']:.2f}x |")
    d = data.get("documents", {})
    if "block_mask_kernel" in d:
        flex = f", torch FlexAttention {d['flex']['min_ms']:.1f} ms" if "min_ms" in d.get("flex", {}) else ""
        out.append(f"\nDocument mask, {d['documents']} documents in N={d['N']} (H={d['H']}, d={d['d']}): block mask "
                   f"{d['block_mask_kernel']['min_ms']:.1f} ms (public call {d['block_mask_public']['min_ms']:.1f}), "
                   f"{d['time_fraction_vs_no_mask']:.3f} of the time without a mask for {d['visible_fraction_tiles']:.3f} "
                   f"of the tiles; every tile through the mask_mod {d['every_tile_mask_mod_kernel']['min_ms']:.0f} ms; "
                   f"the same mask as a dense bool array {d['dense_mask_public']['min_ms']:.1f} ms{flex}.")
    note = data.get("provenance", {}).get("code", {}).get("note")
    if note:
        out.append(f"\nNote: {note}")
    return "\n".join(out + ["", _label(path, data)])


def _cpu_backward_headline(path, data) -> str:
    """CPU backward at N = 4096 (B=1, H=8, d=64, fp32): the numba backward beside torch and NumPy."""
    rows = [r for r in data["results"] if r["N"] == 4096]
    out = [f"**CPU backward**, fp32, B=1, H=8, N=4096, d=64, all cores, TFLOP counted as 2.5x the forward "
           f"(sgemm on the same cores: {data['sgemm']['gflops']:.0f} GFLOP/s)", "",
           "| causal | backend | ms | GFLOP/s | time / torch SDPA | speed-up over numpy-standard |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["causal"], r["impl"])):
        vt = f"{r['time_vs_torch']:.2f}" if "time_vs_torch" in r else ""
        vs = f"{r['speedup_vs_numpy_standard']:.2f}" if "speedup_vs_numpy_standard" in r else ""
        out.append(f"| {'yes' if r['causal'] else 'no'} | {r['impl']} | {r['ms']:.0f} | {r['gflops']:.0f} | {vt} | {vs} |")
    for m in data.get("memory", []):
        if m.get("extra_bytes_rss") is not None:
            out.append(f"\nExtra memory of one backward at N={m['N']}: {m['impl']} {m['extra_bytes_rss'] / 2**20:,.1f} MiB "
                       f"(analytic {m['extra_bytes_analytic'] / 2**20:,.1f} MiB).")
    return "\n".join(out + ["", _label(path, data)])


def _decode_headline(path, data) -> str:
    """One decoding step against the longest cache measured: time, K/V bytes read per second, bandwidth share."""
    side = data.get("gpu") or data.get("cpu")
    if not side or not side.get("rows"):
        return ""
    rows = [r for r in side["rows"] if r.get("kind", "GQA") == "GQA" and "sweep" not in r["method"]
            and "noprefetch" not in r["method"]
            and not (r.get("bulk") and r["splits"] != min(x["splits"] for x in side["rows"]
                                                          if x["method"] == r["method"] and x["B"] == r["B"]))]  # BULK: one wave only
    L = max(r["L"] for r in rows)
    copy = side["bandwidth"]["copy_GBps"]
    where = side.get("name", "CPU")
    out = [f"**Decoding** one token on {where}: GQA {rows[0]['Hq']}/{rows[0]['Hkv']}, d={rows[0]['d']}, "
           f"{rows[0]['dtype']}, KV cache of {L} tokens (copy bandwidth measured in the same run: {copy:,.0f} GB/s)", "",
           "| batch | method | µs per step | K+V read GB/s | of copy bandwidth |", "| --- | --- | --- | --- | --- |"]
    for r in sorted((r for r in rows if r["L"] == L), key=lambda r: (r["B"], r["us"] if "us" in r else r["ms"] * 1e3)):
        us = r["us"] if "us" in r else r["ms"] * 1e3
        out.append(f"| {r['B']} | {r['method']} | {us:,.1f} | {r['kv_GBps']:,.0f} | {r['kv_GBps'] / copy:.0%} |")
    return "\n".join(out + ["", _label(path, data)])


SECTIONS = {"backends": backends_table, "results": results_section}


def render(text: str) -> str:
    for name, fn in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README.md lacks the markers <!-- {name}:begin --> ... <!-- {name}:end -->")
        text = pattern.sub(lambda m: m.group(1) + fn() + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md is out of date: run `python -m benchmarks.report`", file=sys.stderr)
            return 1
        return 0
    if new != old:
        write_text(readme, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
