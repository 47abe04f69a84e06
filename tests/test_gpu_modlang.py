"""flashkit.gpu.modlang: score_mod / mask_mod translated to CUDA (no GPU needed).

The translation text and its errors are pure Python; the generated code is compiled by the local nvcc
(skipped without it), and run on the CPU by g++ (the device functions are plain C++; skipped without it)
to check that the translated functions give Python's answers, position by position."""
from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest

from flashkit.gpu.flash import KERNEL_DIR  # the shared headers (mma.cuh ...) the kernels include

from flashkit import blockmask, mods
from flashkit.gpu import flash_mods, modlang
from flashkit.gpu.modlang import UnsupportedMod

Nq, Nk, H, B = 13, 21, 3, 2
IDS = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3] + [0] * 8)[:Nk]


def _user_if(score, b, h, q_idx, kv_idx):
    bias = 0.25 * (h + 1)
    if kv_idx % 3 == 0:
        return 4.0 * math.tanh(score / 4.0) - bias
    return score * 0.5 + math.exp(-abs(q_idx - kv_idx) / 8.0)


def _user_floor(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) // 4 == -1 or (kv_idx - 2 * q_idx) % 5 == 3


def _user_negative_index(score, b, h, q_idx, kv_idx):
    return score + IDS[-1 - kv_idx % 4]


MASKS = {
    "causal": mods.causal(Nq, Nk),
    "causal_top_left": mods.causal_top_left(),
    "sliding_window": mods.sliding_window(Nq, Nk, 3, 1),
    "sliding_window_unbounded": mods.sliding_window(Nq, Nk, -1, 2),
    "document_mask": mods.document_mask([4, 9], [8, 13]),
    "prefix_lm": mods.prefix_lm(np.array([2, 5]), Nq, Nk),
    "dilated": mods.dilated(Nq, Nk, 3, 1, 2),
    "strided": mods.strided(Nq, Nk, 3),
    "global_window": mods.global_window(Nq, Nk, 2, 1),
    "and_or": mods.or_masks(mods.and_masks(mods.document_mask([4, 9], [8, 13]), mods.causal(Nq, Nk)),
                            mods.global_window(Nq, Nk, 1, 0)),
    "user_floor": _user_floor,
    "lambda": lambda b, h, q_idx, kv_idx: (q_idx + kv_idx) % 4 != 0,
}
SCORES = {
    "identity": mods.identity,
    "softcap": mods.softcap(2.0),
    "alibi": mods.alibi(mods.alibi_slopes(H), offset=Nk - Nq),
    "relative_position_bias": mods.relative_position_bias(np.random.default_rng(0).standard_normal((H, 8)), True, 16),
    "user_if": _user_if,
    "user_negative_index": _user_negative_index,
}


def test_every_library_mod_translates():
    for fn in MASKS.values():
        code = modlang.translate("mask_mod", fn)
        assert "fkm_mask_mod(long long b, long long h, long long q_idx, long long kv_idx, int* fk_err" in code.source
    for name, fn in SCORES.items():
        code = modlang.translate("score_mod", fn)
        assert code.source.count("__device__") >= 2, name
    doc = modlang.translate("mask_mod", MASKS["document_mask"])
    assert [a.ctype for a in doc.arrays] == ["int", "int"] and "fk_ix(q_idx, 13LL" in doc.source
    assert "fk_tanh" in modlang.translate("score_mod", SCORES["softcap"]).source
    rpb = modlang.translate("score_mod", SCORES["relative_position_bias"])
    assert len(rpb.arrays) == 2 and rpb.arrays[0].shape == (H, 8) and "* 8LL" in rpb.source  # 2-D lookup


def test_only_codes_that_cannot_record_an_error_skip_the_error_word():
    """DeviceCode.cannot_fail decides whether the GPU forward reads the error word (a host sync) after the
    kernel: a mask_mod without lookups or divisions, and the score_mods the library marks (mods.cannot_fail:
    softcap, identity). Everything that can index, divide or return NaN keeps the check."""
    safe_masks = {"causal", "causal_top_left", "sliding_window", "sliding_window_unbounded", "dilated", "strided",
                  "global_window", "user_floor", "lambda"}
    for name, fn in MASKS.items():
        code = modlang.translate("mask_mod", fn)
        assert code.cannot_fail == (name in safe_masks) == (not code.sites), name
    for name, fn in SCORES.items():
        assert modlang.translate("score_mod", fn).cannot_fail == (name in ("identity", "softcap")), name
    assert modlang.translate("score_mod", mods.softcap(2.0)).sites  # a division site, discharged by the mark
    assert modlang.translate_derivative(mods.softcap(2.0)).cannot_fail
    assert not modlang.translate_derivative(SCORES["user_if"]).cannot_fail

    def doubled(score, b, h, q_idx, kv_idx):  # no site, but it can overflow to +inf: not marked, so checked
        return score * 1e30

    assert not modlang.translate("score_mod", doubled).sites and not modlang.translate("score_mod", doubled).cannot_fail
    assert mods.declared_cannot_fail(mods.cannot_fail(doubled))  # the mark, as the library uses it


def test_translation_is_cached_and_follows_captured_values():
    ids = np.array([0, 0, 1])

    def m(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    a = modlang.translate("mask_mod", m)
    assert modlang.translate("mask_mod", m) is a
    ids[0] = 5  # new contents: the same code (the contents are a kernel argument, uploaded again)
    assert modlang.translate("mask_mod", m) is a
    ids[0] = 1 << 40  # no longer fits the int32 the code reads it as: a new translation, reading int64
    b = modlang.translate("mask_mod", m)
    assert b is not a and "long long" in b.params and "const int*" in a.params

    def n(b, h, q_idx, kv_idx):
        return ids[q_idx] == 0

    c = modlang.translate("mask_mod", n)
    ids = np.array([0, 1, 1])  # the closure now holds another array: a new translation that reads it
    d = modlang.translate("mask_mod", n)
    assert d is not c and d.arrays[0].value is ids


def _error(kind, fn):
    with pytest.raises(UnsupportedMod) as info:
        modlang.translate(kind, fn)
    return str(info.value)


def test_errors_name_the_function_the_construct_and_the_line():
    def loops(b, h, q_idx, kv_idx):
        ok = True
        for _ in range(3):
            ok = not ok
        return ok

    msg = _error("mask_mod", loops)
    line = loops.__code__.co_firstlineno + 2
    assert "'test_errors_name_the_function_the_construct_and_the_line.<locals>.loops'" in msg
    assert f"line {line}" in msg and "For" in msg and "for _ in range(3)" in msg

    def returns_float(b, h, q_idx, kv_idx):
        return q_idx * 0.5

    assert "must return a bool" in _error("mask_mod", returns_float)

    def returns_bool(score, b, h, q_idx, kv_idx):
        return score > 0

    assert "returns a bool" in _error("score_mod", returns_bool)

    def unknown(b, h, q_idx, kv_idx):
        return q_idx < not_defined_anywhere  # noqa: F821

    assert "`not_defined_anywhere` is not defined" in _error("mask_mod", unknown)

    def string(b, h, q_idx, kv_idx):
        return "yes" == "no"

    assert "the constant 'yes'" in _error("mask_mod", string)

    def whole_array(b, h, q_idx, kv_idx):
        return IDS == 1

    assert "used whole" in _error("mask_mod", whole_array)

    def retyped(score, b, h, q_idx, kv_idx):
        x = q_idx > 2
        x = score
        return x

    assert "a name keeps one type" in _error("score_mod", retyped)

    def and_numbers(b, h, q_idx, kv_idx):
        return (q_idx and kv_idx) > 0

    assert "`and` on an int" in _error("mask_mod", and_numbers)

    def maybe_no_return(b, h, q_idx, kv_idx):
        if q_idx > 0:
            return True

    assert "without a return" in _error("mask_mod", maybe_no_return)

    def float_index(score, b, h, q_idx, kv_idx):
        return score + IDS[q_idx / 2]

    assert "array indices must be integers" in _error("score_mod", float_index)

    def calls_print(b, h, q_idx, kv_idx):
        print(q_idx)
        return True

    assert "Expr" in _error("mask_mod", calls_print)

    def recursive(b, h, q_idx, kv_idx):
        return recursive(b, h, q_idx - 1, kv_idx) if q_idx > 0 else True

    assert "calls itself" in _error("mask_mod", recursive)

    nested = mods.and_masks(mods.causal(4, 4), returns_float)
    assert "`&` on a float" in _error("mask_mod", nested)  # caught where it is combined


def test_an_error_inside_a_called_function_names_both():
    def helper(q_idx):
        while q_idx > 0:
            q_idx -= 1
        return q_idx

    def outer(b, h, q_idx, kv_idx):
        return helper(q_idx) == 0

    msg = _error("mask_mod", outer)
    assert "outer" in msg and "(in 'test_an_error_inside_a_called_function_names_both.<locals>.helper'" in msg
    assert "While" in msg


def test_the_full_source_puts_the_hooks_before_rung_6():
    text = flash_mods.source(SCORES["softcap"], MASKS["document_mask"], bits=True)
    head, rung = text.split("// ==== rung 6 ====")
    assert "#define FK_PARAMS" in head and "#define FK_SCORES(s, it, j0, full)" in head and "fk_scores<true>" in head
    assert "#ifndef FK_PARAMS" in rung and "FK_KEEP(i, j, it, j >= lo && j < hi)" in rung
    plain = flash_mods.source(None, None, bits=False)
    assert "#define FK_SCORES(s, it, j0, full)\n#define FK_ROW_DONE(i, l)\n" in plain and "#define FK_HAS_MASK_MOD 0" in plain


def test_regrid_keeps_the_classification_exact():
    fn = mods.and_masks(mods.document_mask([50, 77]), mods.causal(127, 127))
    fine = blockmask.block_mask(fn, None, None, 127, 127, block_size=(16, 8), engine="numpy")
    for Br, Bc in ((64, 32), (32, 64), (16, 8), (128, 128)):
        want = blockmask.block_mask(fn, None, None, 127, 127, block_size=(Br, Bc), engine="numpy").tiles
        got = flash_mods.regrid(fine.tiles, 16, 8, 127, 127, Br, Bc)
        # the new tiles are unions of old ones: the same states as classifying them directly
        assert np.array_equal(got, want), (Br, Bc)
    coarse = blockmask.block_mask(fn, None, None, 127, 127, block_size=(128, 128), engine="numpy")
    got = flash_mods.regrid(coarse.tiles, 128, 128, 127, 127, 64, 32)
    assert (got == coarse.tiles[0, 0, 0, 0]).all()


def test_tile_lists_order_and_flags():
    window = np.array([[2, 0, 1]], np.int8)  # FULL, SKIP, PARTIAL for one block row
    mod = np.array([[[[1, 2, 2]]]], np.int8)  # mask_mod: PARTIAL, FULL, FULL
    start, count, index, bits_at = flash_mods.tile_lists(window, mod)
    assert count.tolist() == [[[2]]] and start.tolist() == [[[0]]] and index.tolist() == [2 * 0 + 1, 2 * 2]
    assert bits_at is None


def test_tile_lists_are_packed_rows_with_bits_offsets():
    # two block rows, two heads of a bool mask: only visible tiles are stored, row after row
    window = np.array([[2, 2, 2], [0, 2, 1]], np.int8)
    bools = np.array([[[[0, 1, 2], [2, 2, 2]], [[2, 0, 0], [1, 1, 0]]]], np.int8)  # (1, 2, 2, 3)
    offsets = np.where(bools == 1, 100 + np.arange(12).reshape(bools.shape), -1).astype(np.int32)
    start, count, index, bits_at = flash_mods.tile_lists(window, None, bools, offsets)
    assert count.tolist() == [[[2, 2], [1, 1]]] and start.tolist() == [[[0, 2], [4, 5]]]
    assert index.tolist() == [3, 4, 2, 4, 0, 3]  # entry 2 j + (bool mask PARTIAL)
    assert bits_at.tolist() == [101, -1, -1, -1, -1, 110]


def test_block_order_puts_the_costliest_rows_first():
    cost = np.array([[[1, 5, 5, 2]]])  # one plane of lists, Tr = 4, for B = 1, Hq = 2
    order, ordered = flash_mods.block_order(cost, 1, 2)
    # rung 6's own order is (b Hq + hq) Tr + tr with tr falling, head after head: 3 2 1 0 7 6 5 4
    assert ordered and order.tolist() == [2, 1, 6, 5, 3, 7, 0, 4]
    order, ordered = flash_mods.block_order(np.array([[[3, 3, 4]]]), 1, 1)  # causal-like: already in order
    assert not ordered and order.tolist() == [2, 1, 0]


# ---------------------------------------------------------------------------------------------
# The generated code compiled (nvcc) and run on the CPU (g++)
# ---------------------------------------------------------------------------------------------
def _all_device_functions():
    parts, calls = [modlang.RUNTIME], []
    for k, (name, fn) in enumerate(list(MASKS.items()) + list(SCORES.items())):
        kind = "mask_mod" if name in MASKS else "score_mod"
        code = modlang.translate(kind, fn, prefix=f"t{k}")
        parts.append(code.source)
        calls.append((kind, name, fn, code))
    return parts, calls


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_generated_code_compiles_with_nvcc(tmp_path):
    parts, calls = _all_device_functions()
    for kind, _, _, code in calls:
        args = "score, " if kind == "score_mod" else ""
        parts.append(f'extern "C" __global__ void call_{code.prefix}(float* out, float score, int* err{code.params}) '
                     f'{{ out[0] = (float){code.entry}({args}1, 2, 3, 4, err{code.args}); }}')
    for k, fn in enumerate(SCORES.values()):  # and the derivatives of the score_mods (translate_derivative)
        code = modlang.translate_derivative(fn, prefix=f"n{k}")
        parts.append(code.source)
        parts.append(f'extern "C" __global__ void call_{code.prefix}(float* out, float score, int* err{code.params}) '
                     f'{{ out[0] = {code.entry}(score, 1, 2, 3, 4, err{code.args}); }}')
    src = tmp_path / "mods.cu"
    src.write_text("\n".join(parts))
    run = subprocess.run(["nvcc", "-cubin", "-gencode=arch=compute_90,code=sm_90", "-o", str(tmp_path / "m.cubin"),
                          str(src)], capture_output=True, text=True)  # small kernels: ptxas too
    assert run.returncode == 0, run.stderr[-3000:]
    # and whole kernels: rung 6 with a score_mod, a mask_mod and the bit mask; softcap takes its own path
    # (flash_mods.softcap_of: the cap folded into the scales), alibi the generic one
    for name in ("softcap", "alibi"):
        full = tmp_path / f"rung6_{name}.cu"
        text = flash_mods.source(SCORES[name], MASKS["document_mask"], bits=True)
        assert ("fk_tanh((x) * (scale))" in text) == (name == "softcap")
        full.write_text(text)
        # to PTX only: the C++ is checked, ptxas (half a minute for rung 6 on 2 cores) is left to the GPU run
        run = subprocess.run(["nvcc", "-ptx", "-arch=sm_90", "-DHEAD_DIM=64", "-DBR=128", "-DBC=64", f"-I{KERNEL_DIR}",
                              "-o", str(tmp_path / f"r6_{name}.ptx"), str(full)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]


HOST_SHIMS = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __restrict__
static inline int atomicCAS(int* p, int c, int v) { int o = *p; if (o == c) *p = v; return o; }
static inline void __threadfence() {}
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
"""


def _c_array(cap):
    values = np.ascontiguousarray(cap.value, dtype=cap.dtype).ravel()
    ctype = cap.ctype
    body = ", ".join(repr(float(x)) + "f" if ctype == "float" else str(int(x)) for x in values)
    return f"static const {ctype} {cap.param}[] = {{{body}}};"


def _score_grid():
    s = ((np.arange(Nq)[:, None] * 7 + np.arange(Nk)[None, :] * 3) % 11 - 5) * 0.37
    return s.astype(np.float32)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_translated_mods_give_pythons_answers(tmp_path):
    parts, calls = _all_device_functions()
    main = ["int main() {", "    int err[8] = {0};"]
    for kind, name, _, code in calls:
        parts += [_c_array(a) for a in code.arrays]
        main.append(f'    std::printf("# {name}\\n");')
        main.append(f"    for (int b = 0; b < {B}; ++b) for (int h = 0; h < {H}; ++h) "
                    f"for (int q = 0; q < {Nq}; ++q) for (int k = 0; k < {Nk}; ++k) {{")
        if kind == "mask_mod":
            main.append(f'        std::printf("%d\\n", (int){code.entry}(b, h, q, k, err{code.args}));')
        else:
            main.append("        const float s = (float)(((q * 7 + k * 3) % 11) - 5) * 0.37f;")
            main.append(f'        std::printf("%.9g\\n", {code.entry}(s, b, h, q, k, err{code.args}));')
        main.append("    }")
    main += ['    std::printf("# err %d\\n", err[0]);', "    return 0;", "}"]
    src = tmp_path / "host.cpp"
    src.write_text(HOST_SHIMS + "\n".join(parts) + "\n" + "\n".join(main))
    exe = tmp_path / "host"
    run = subprocess.run(["g++", "-O1", "-std=c++17", "-w", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    blocks = {}
    for chunk in out.split("# ")[1:]:
        head, *rows = chunk.strip().split("\n")
        blocks[head] = rows
    assert blocks["err 0"] == []  # no lookup went out of bounds
    grid = blockmask.index_grid(np.arange(B), np.arange(H), 0, Nq, 0, Nk)
    for kind, name, fn, _ in calls:
        got = np.array([float(x) for x in blocks[name]]).reshape(B, H, Nq, Nk)
        if kind == "mask_mod":
            want = np.broadcast_to(blockmask.evaluate("mask_mod", fn, grid), got.shape)
            assert np.array_equal(got.astype(bool), want), name
        else:
            S = _score_grid()[None, None].astype(np.float64)
            want = np.broadcast_to(blockmask.evaluate("score_mod", fn, (S,) + grid), got.shape)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_an_out_of_bounds_read_sets_the_error_word(tmp_path):
    ids = np.arange(5)

    def oob(b, h, q_idx, kv_idx):
        return ids[kv_idx + 3] > 0

    code = modlang.translate("mask_mod", oob)
    main = (f"int main() {{ int err[8] = {{0}}; for (int k = 0; k < 4; ++k) {code.entry}(0, 1, 2, k, err{code.args}); "
            'std::printf("%d %d %d %d %d %d\\n", err[0], err[1], err[2], err[3], err[4], err[5]); }')
    src = tmp_path / "oob.cpp"
    src.write_text(HOST_SHIMS + modlang.RUNTIME + code.source + _c_array(code.arrays[0]) + "\n" + main)
    exe = tmp_path / "oob"
    subprocess.run(["g++", "-std=c++17", "-w", "-o", str(exe), str(src)], check=True)
    site, b, h, q, kv, index = (int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True,
                                                                check=True).stdout.split())
    assert (b, h, q, kv, index) == (0, 1, 2, 2, 5)  # the first bad read: kv_idx = 2 reads ids[5]
    assert code.sites[site].what == "lookup" and code.sites[site].size == 5 and "ids[kv_idx + 3]" in code.sites[site].text


def _user_abs(score, b, h, q_idx, kv_idx):
    return abs(score) * 0.5 + score * (kv_idx % 3)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_translated_derivatives_give_mods_grads_answers(tmp_path):
    # d score_mod / d score (flashkit.mods_grad.derivative) translated to CUDA, run on the CPU, against the
    # Python derivative evaluated by NumPy, position by position
    from flashkit import mods_grad

    fns = dict(SCORES, user_abs=_user_abs)
    parts, main, codes = [modlang.RUNTIME], ["int main() {", "    int err[8] = {0};"], {}
    for k, (name, fn) in enumerate(fns.items()):
        code = modlang.translate_derivative(fn, prefix=f"g{k}")
        codes[name] = code
        parts.append(code.source)
        parts += [_c_array(a) for a in code.arrays]
        main.append(f'    std::printf("# {name}\\n");')
        main.append(f"    for (int b = 0; b < {B}; ++b) for (int h = 0; h < {H}; ++h) "
                    f"for (int q = 0; q < {Nq}; ++q) for (int k = 0; k < {Nk}; ++k) {{")
        main.append("        const float s = (float)(((q * 7 + k * 3) % 11) - 5) * 0.37f;")
        main.append(f'        std::printf("%.9g\\n", {code.entry}(s, b, h, q, k, err{code.args}));')
        main.append("    }")
    main += ['    std::printf("# err %d\\n", err[0]);', "    return 0;", "}"]
    src = tmp_path / "grad.cpp"
    src.write_text(HOST_SHIMS + "\n".join(parts) + "\n" + "\n".join(main))
    exe = tmp_path / "grad"
    run = subprocess.run(["g++", "-O1", "-std=c++17", "-w", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    blocks = {head: rows for head, *rows in (c.strip().split("\n") for c in out.split("# ")[1:])}
    assert blocks["err 0"] == []
    assert "fk_sign" in codes["user_abs"].source and codes["softcap"].entry == "g1_score_grad"
    grid = blockmask.index_grid(np.arange(B), np.arange(H), 0, Nq, 0, Nk)
    S = _score_grid()[None, None].astype(np.float64)
    for name, fn in fns.items():
        got = np.array([float(x) for x in blocks[name]]).reshape(B, H, Nq, Nk)
        want = np.broadcast_to(blockmask.evaluate("score_mod", mods_grad.derivative(fn), (S,) + grid), got.shape)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)
