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
    for path, data in _load("gpu-*.json"):
        if path.name.startswith("gpu-bwd-"):
            parts.append(_gpu_backward_headline(path, data))
        elif path.name.startswith("gpu-overhead-"):
            parts.append(_gpu_overhead_headline(path, data))
        else:
            parts.append(_gpu_headline(path, data))
    for path, data in _load("decode-*.json"):
        parts.append(_decode_headline(path, data))
    if not parts:
        return "No results recorded yet: run `make bench` (CPU) or `python -m benchmarks.gpu_check` (GPU)."
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


def _cpu_headline(path, data) -> str:
    """CPU forward at N = 4096 (B=1, H=8, d=64, fp32): the fastest Numba rung beside its peers."""
    fastest = data.get("fastest_numba_rung", "numba-gemm")
    rows = {(r["impl"], r["causal"]): r for r in data["results"] if r["N"] == 4096}
    out = [f"**CPU forward**, fp32, B=1, H=8, N=4096, d=64, all cores "
           f"(sgemm on the same cores: {data['sgemm']['gflops']:.0f} GFLOP/s)", "",
           "| causal | backend | ms | GFLOP/s | time / torch SDPA | speed-up over numpy-standard |",
           "| --- | --- | --- | --- | --- | --- |"]
    for causal in (False, True):
        for impl in ("numpy-standard", fastest, "torch-sdpa"):
            r = rows.get((impl, causal))
            if r is not None:
                out.append(f"| {'yes' if causal else 'no'} | {impl} | {r['ms']:.0f} | {r['gflops']:.0f} | "
                           f"{r['time_vs_torch']:.2f} | {r['speedup_vs_numpy_standard']:.2f} |")
    mem = {(m["impl"], m["N"]): m for m in data.get("memory", [])}
    std, fast = mem.get(("numpy-standard", 16384)), mem.get(("numba", 16384))
    if std and fast:
        out += ["", f"Extra memory at N=16384: numpy-standard {std['extra_bytes_rss'] / 2**20:,.0f} MiB, "
                    f"numba {fast['extra_bytes_rss'] / 2**20:,.1f} MiB ({fast['pct_of_numpy_standard']:.3f}%)."]
    for run in data.get("long_runs", []):
        if "seconds" in run:
            out.append(f"numba at N={run['N']}{' causal' if run.get('causal') else ''}: {run['seconds']:.1f} s.")
    return "\n".join(out + ["", _label(path, data)])


def _gpu_headline(path, data) -> str:
    """GPU forward at N = 4096: the best tensor-core and fp32 rungs against the torch backend each aims at."""
    rows = [r for r in data["results"] if r["N"] == 4096 and r.get("status") == "ok"]
    best = {}
    for r in rows:
        if r.get("rung") in (None, 1) or "ratio" not in r:
            continue
        key = (r["dtype"], r["d"], r["causal"])
        if key not in best or r["tflops"] > best[key]["tflops"]:
            best[key] = r
    out = ["**GPU forward** on " + data["card"] + ", B·N=16384, H·d=2048, N=4096", "",
           "| dtype | d | causal | best rung | ms | TFLOP/s | peer | ratio (peer time / rung time) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (dtype, d, causal), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        if dtype == "bfloat16":
            continue
        out.append(f"| {dtype} | {d} | {'yes' if causal else 'no'} | {r['impl']} | {r['ms']:.2f} | "
                   f"{r['tflops']:.0f} | {r['peer']} | {r['ratio']:.2f} |")
    return "\n".join(out + ["", _label(path, data)])


def _gpu_backward_headline(path, data) -> str:
    """GPU backward at N = 4096: each backward rung beside torch's flash backward and the fastest torch one."""
    rows = [r for r in data["results"] if r["N"] == 4096 and r.get("status") == "ok"]
    torch = {}
    for r in rows:
        if r["impl"].startswith("torch-"):
            torch.setdefault((r["dtype"], r["d"], r["causal"]), {})[r["impl"]] = r
    out = ["**GPU backward** on " + data["card"] + ", B·N=16384, H·d=2048, N=4096, TFLOP/s counting 2.5x the "
           "forward's FLOPs (backward alone)", "",
           "| dtype | d | causal | rung | ms | TFLOP/s | peer | ratio (peer time / rung time) | fastest torch | ratio |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted((r for r in rows if not r["impl"].startswith("torch-")),
                    key=lambda r: (r["dtype"], r["d"], r["causal"], -r["tflops"])):
        peers = torch.get((r["dtype"], r["d"], r["causal"]), {})
        if not peers or "ratio" not in r:
            continue
        fastest = min(peers.values(), key=lambda p: p["ms"])
        out.append(f"| {r['dtype']} | {r['d']} | {'yes' if r['causal'] else 'no'} | {r['impl']} | {r['ms']:.2f} | "
                   f"{r['tflops']:.0f} | {r['peer']} | {r['ratio']:.2f} | {fastest['impl']} | "
                   f"{fastest['ms'] / r['ms']:.2f} |")
    return "\n".join(out + ["", _label(path, data)])


def _gpu_overhead_headline(path, data) -> str:
    """What the public call costs beyond its kernel (benchmarks/gpu_overhead.py)."""
    out = ["**GPU public call against the rung alone**, B=4, N=4096, H=32, d=64, not causal (ms per call)", "",
           "| dtype | what | ms |", "| --- | --- | --- |"]
    for r in data["results"]:
        out.append(f"| {r['dtype']} | {r['what']} | {r['ms']:.3f} |")
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
            and "noprefetch" not in r["method"]]
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
