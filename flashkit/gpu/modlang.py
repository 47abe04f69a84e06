"""score_mod and mask_mod for the GPU: a small subset of Python, read with `ast` and written out as CUDA.

Numba compiles a mod for the CPU (flashkit/cpu/mods_jit.py); the tensor-core rung needs the same
function as a CUDA device function, compiled into its source by NVRTC. This module reads the
function's source (inspect.getsource), checks that it stays inside a subset whose meaning is the same
in CUDA as in Python, and translates it:

    def my_alibi(score, b, h, q_idx, kv_idx):           __device__ float fks_score_mod(float score,
        return score + slopes[h] * (kv_idx - q_idx)         long long b, ..., const float* fks_a0) {...}

The subset (everything else is an `UnsupportedMod` error naming the function, the construct and the line):

    values      numbers; captured (closure or global) ints, floats and bools, baked in as constants;
                captured NumPy or CuPy arrays, read by index (`a[i]`, `table[h, j]`): passed to the kernel
    arithmetic  + - * / // % ** (Python's meaning: / is true division, // and % floor, as on ints)
                comparisons (chains too), & | ^ ~ on bools (NumPy's meaning), and / or / not
    choices     `x if cond else y`, `where(cond, x, y)` (flashkit.mods.where, np.where), `if ...: return`
    functions   exp, log, tanh, sqrt, exp2, log2, floor, ceil (math.* or np.*), abs, np.sign, min, max,
                np.minimum, np.maximum, int(), float(), mods.soft_cap, and calls to other Python functions
                in the subset (translated too, e.g. the parts of mods.and_masks)
    statements  `name = expr` (a name keeps one type), `return`, `if` / `else`, docstrings

Types follow Python: int (64-bit in CUDA, as NumPy's int64), float (the kernel's fp32 scores), bool.
Reading an array out of its bounds, or dividing by zero, does not read garbage: the kernel records the
first such event (which lookup, and where) in an error word that the launcher reads after the call and
raises as IndexError / ZeroDivisionError. A negative index counts from the end, as in Python.

`translate_derivative(score_mod)` does the same for d score_mod / d score, written as Python by
flashkit.mods_grad.derivative (generated functions carry their text in `__flashkit_source__`): what a
GPU backward with a score_mod needs for dS = P (dP - D) f'(s). No GPU kernel calls it yet; it is checked
against mods_grad's derivative on the CPU (tests/test_gpu_modlang.py).

Pure Python (ast, inspect, NumPy); no CuPy: notebook 13 shows the generated code on a CPU machine.
"""
from __future__ import annotations

import ast
import builtins
import inspect
import math
import textwrap
import types as pytypes
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from flashkit import blockmask, mods

SUPPORTED = ("The GPU compiles a subset of Python: numbers, arithmetic, comparisons, & | ~ on bools, and/or/not, "
             "x if c else y, where(), exp/log/tanh/sqrt/abs/min/max, lookups a[i] of captured arrays, captured "
             "numbers, assignments, if/return, and calls to functions written the same way "
             "(see flashkit.gpu.modlang). backend='numba-mods' or 'numpy-tiled' runs any Python on the CPU.")

BOOL, INT, FLOAT = "bool", "int", "float"
CTYPE = {BOOL: "bool", INT: "long long", FLOAT: "float"}

# error codes the kernel writes in err[0] (>= FIRST_SITE: an array lookup or a division, by site)
NONFINITE = 1
FIRST_SITE = 16  # the score_mod's sites; the mask_mod's from MASK_SITES
MASK_SITES = 1 << 20
GRAD_SITES = 1 << 19  # the derivative of a score_mod (translate_derivative)


class UnsupportedMod(TypeError):
    """A score_mod or mask_mod the GPU cannot compile: outside the subset, or of the wrong type."""


@dataclass
class Capture:
    """One captured array, a kernel argument: `param` in the generated code, `name` in the user's."""
    param: str
    name: str
    value: Any  # the array as captured (NumPy or CuPy)
    ctype: str  # "float", "int", "long long" or "unsigned char"
    shape: Tuple[int, ...]

    @property
    def dtype(self):
        return {"float": np.float32, "int": np.int32, "long long": np.int64, "unsigned char": np.uint8}[self.ctype]


@dataclass
class Site:
    """Where a run-time error can happen: an array lookup or a division, for the message."""
    what: str  # "lookup" or "division"
    fn: Any
    line: int
    text: str
    size: Optional[int] = None  # the dimension's length, for a lookup


@dataclass
class DeviceCode:
    """A mod translated to CUDA: `source` defines `entry`, a __device__ function taking (score,) b, h,
    q_idx, kv_idx, the error word and one pointer per captured array (`arrays`, in that order)."""
    kind: str
    fn: Any
    prefix: str
    entry: str
    source: str
    arrays: List[Capture]
    sites: Dict[int, Site]
    key: tuple  # what the code depends on besides array contents: the compile cache's key
    # True when the kernel cannot record an error for this code with finite inputs, so the launcher may skip
    # reading the error word (the host sync that keeps the GPU waiting for the next call's host work): a
    # mask_mod without lookups or divisions (its only errors are those sites), or a score_mod the library
    # declares so (mods.cannot_fail: finite for every finite score, no error at any position)
    cannot_fail: bool = False

    @property
    def params(self) -> str:
        """The kernel parameters the captured arrays travel in (", const float* __restrict__ fks_a0")."""
        return "".join(f", const {a.ctype}* __restrict__ {a.param}" for a in self.arrays)

    @property
    def args(self) -> str:
        return "".join(f", {a.param}" for a in self.arrays)


def _int_literal(v: int) -> str:
    if not -(1 << 63) <= v < (1 << 63):
        raise OverflowError(v)
    return f"{v}LL" if v != -(1 << 63) else "(-9223372036854775807LL - 1)"


def _float_literal(v: float) -> str:
    if math.isnan(v):
        return "__int_as_float(0x7fffffff)"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return repr(float(np.float32(v))) + "f" if abs(v) < 3.4e38 else ("INFINITY" if v > 0 else "(-INFINITY)")


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or type(v).__module__.startswith("cupy")


# The functions a mod may call, by the Python object: name -> (C function per argument type, arity).
_UNARY_FLOAT = {"exp": "expf", "log": "logf", "tanh": "fk_tanh", "sqrt": "sqrtf", "exp2": "exp2f",
                "log2": "log2f", "floor": "floorf", "ceil": "ceilf"}


def _known_functions():
    table = {}
    for name in _UNARY_FLOAT:
        for module in (math, np):
            if hasattr(module, name):
                table[id(getattr(module, name))] = name
    table.update({id(abs): "abs", id(np.abs): "abs", id(np.absolute): "abs", id(min): "min", id(max): "max",
                  id(np.minimum): "min", id(np.maximum): "max", id(np.where): "where", id(mods.where): "where",
                  id(np.sign): "sign",
                  id(int): "int", id(float): "float", id(bool): "bool", id(np.float32): "float",
                  id(np.float64): "float", id(np.int64): "int", id(np.int32): "int", id(np.bool_): "bool"})
    return table


_KNOWN = _known_functions()
_KNOWN_CONSTANTS = {id(math.pi): math.pi, id(math.e): math.e}


@dataclass
class _Function:
    """One translated Python function (the mod itself or one it calls)."""
    fn: Any
    node: Any  # ast.FunctionDef or ast.Lambda
    first_line: int
    source_lines: List[str]
    names: Dict[str, Any] = field(default_factory=dict)  # captured names -> values


class Translator:
    """Translates one mod (and the functions it calls) into CUDA; see the module docstring."""

    def __init__(self, kind: str, fn, prefix: str, first_site: int):
        self.kind, self.top, self.prefix, self.first_site = kind, fn, prefix, first_site
        self.arrays: List[Capture] = []
        self.sites: Dict[int, Site] = {}
        self.functions: List[str] = []  # C definitions, callees first
        self.made: Dict[tuple, Tuple[str, str]] = {}  # (id(fn), arg types) -> (C name, return type)
        self.key: List[Any] = []
        self.stack: List[Any] = []

    # ---- errors -------------------------------------------------------------------------------
    def fail(self, f: Optional[_Function], node, what: str):
        if f is None:
            raise UnsupportedMod(f"{self.kind} {blockmask.describe(self.top)}: {what}. {SUPPORTED}")
        line = f.first_line + getattr(node, "lineno", 1) - 1
        rel = getattr(node, "lineno", 1) - 1
        text = f.source_lines[rel].strip() if 0 <= rel < len(f.source_lines) else ""
        inner = "" if f.fn is self.top else f" (in {blockmask.describe(f.fn)}, which it calls)"
        raise UnsupportedMod(f"{self.kind} {blockmask.describe(self.top)}{inner}, line {line} `{text}`: {what}. "
                             f"{SUPPORTED}")

    # ---- reading the source -------------------------------------------------------------------
    def parse(self, fn) -> _Function:
        f = blockmask.python_function(fn)
        if not isinstance(f, pytypes.FunctionType):
            self.fail(None, None, f"it is a {type(f).__name__}, not a Python function whose source can be read")
        try:
            lines, first = inspect.getsourcelines(f)
        except (OSError, TypeError):
            lines = None
        generated = getattr(f, "__flashkit_source__", None)  # flashkit.mods_grad's derivatives: their own text
        if lines is None and generated is not None:
            lines, first = _generated_def(generated, f.__name__), 1
        if lines is None:
            self.fail(None, None, f"the source of {blockmask.describe(fn)} cannot be read (defined in an "
                                  "interactive prompt or generated?); define it in a file or a notebook cell")
        src = textwrap.dedent("".join(lines))
        node = None
        if f.__name__ == "<lambda>":
            node = self._find_lambda(f, src)
        else:
            try:
                tree = ast.parse(src)
            except SyntaxError:
                tree = None
            if tree is not None and tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
                node = tree.body[0]
        if node is None:
            self.fail(None, None, f"the source of {blockmask.describe(fn)} could not be parsed on its own")
        if isinstance(node, ast.AsyncFunctionDef):
            self.fail(_Function(f, node, first, src.splitlines()), node, "an async function")
        names = dict(f.__globals__)
        names.update({n: c.cell_contents for n, c in zip(f.__code__.co_freevars, f.__closure__ or ())
                      if _has_contents(c)})
        return _Function(f, node, first, src.splitlines(), names)

    def _find_lambda(self, f, src):
        text = src.strip()
        candidates = []
        for start in range(len(text)):  # the smallest parseable piece that holds the lambda
            if text.startswith("lambda", start):
                for end in range(len(text), start, -1):
                    try:
                        tree = ast.parse(text[start:end].rstrip(",);"), mode="eval")
                    except SyntaxError:
                        continue
                    if isinstance(tree.body, ast.Lambda):
                        candidates.append(tree.body)
                    break
        wanted = list(f.__code__.co_varnames[: f.__code__.co_argcount])
        found = [c for c in candidates if [a.arg for a in c.args.args] == wanted]
        if len(found) != 1:
            return None
        return found[0]

    # ---- translation --------------------------------------------------------------------------
    def function(self, fn, arg_types: Tuple[str, ...]) -> Tuple[str, str]:
        """(C name, return type) of `fn` translated for these argument types."""
        py = blockmask.python_function(fn)
        key = (id(py), arg_types)
        if key in self.made:
            return self.made[key]
        if py in self.stack:
            self.fail(None, None, f"{blockmask.describe(fn)} calls itself (recursion)")
        self.stack.append(py)
        f = self.parse(fn)
        node = f.node
        a = node.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults:
            self.fail(f, node, "*args, **kwargs, keyword-only or default arguments")
        params = [p.arg for p in a.args]
        if len(params) != len(arg_types):
            self.fail(f, node, f"it takes {len(params)} arguments, called with {len(arg_types)}")
        env = dict(zip(params, arg_types))
        self.key.append((py.__code__.co_code, py.__code__.co_consts, arg_types))
        body_lines: List[str] = []
        if isinstance(node, ast.Lambda):
            code, t = self.expr(f, env, node.body)
            returns = {t}
            body_lines.append(f"    return {code};")
        else:
            returns = set()
            self.block(f, env, node.body, body_lines, returns, "    ")
            if not _always_returns(node.body):
                self.fail(f, node.body[-1], "the function can end without a return")
        rtype = _unify(returns) if returns else None
        if rtype is None:
            self.fail(f, node, f"its returns mix types ({', '.join(sorted(returns))})")
        name = f"{self.prefix}_f{len(self.made)}"
        ctx = f"const {self.prefix}_ctx& ctx"
        sig = ", ".join([ctx] + [f"{CTYPE[t]} {p}" for p, t in zip(params, arg_types)])
        body = _cast_returns("\n".join(body_lines), CTYPE[rtype])
        self.functions.append(f"// {blockmask.describe(fn)}\n__device__ __forceinline__ {CTYPE[rtype]} "
                              f"{name}({sig}) {{\n{body}\n}}")
        self.made[key] = (name, rtype)
        self.stack.pop()
        return name, rtype

    def block(self, f, env, stmts, out, returns, indent):
        for st in stmts:
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str):
                continue  # a docstring
            if isinstance(st, ast.Pass):
                continue
            if isinstance(st, ast.Return):
                if st.value is None:
                    self.fail(f, st, "a return without a value")
                code, t = self.expr(f, env, st.value)
                returns.add(t)
                out.append(f"{indent}return {code};")
            elif isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                target = st.targets[0] if isinstance(st, ast.Assign) else st.target
                if (isinstance(st, ast.Assign) and len(st.targets) != 1) or not isinstance(target, ast.Name):
                    self.fail(f, st, "an assignment to anything but one name (no unpacking, no a[i] = ...)")
                if st.value is None:
                    continue
                value = ast.BinOp(left=ast.Name(id=target.id, ctx=ast.Load()), op=st.op, right=st.value,
                                  lineno=st.lineno) if isinstance(st, ast.AugAssign) else st.value
                code, t = self.expr(f, env, value)
                name = target.id
                if name in env:
                    if env[name] != t and not (env[name] == FLOAT and t in (INT, BOOL)):
                        self.fail(f, st, f"`{name}` was {_a(env[name])} and becomes {_a(t)}: a name keeps one "
                                         "type in compiled code")
                    out.append(f"{indent}{name} = ({CTYPE[env[name]]})({code});")
                else:
                    env[name] = t
                    out.append(f"{indent}{CTYPE[t]} {name} = {code};")
            elif isinstance(st, ast.If):
                cond, t = self.expr(f, env, st.test)
                out.append(f"{indent}if ({self.truth(f, st.test, cond, t)}) {{")
                self.block(f, dict(env), st.body, out, returns, indent + "    ")
                if st.orelse:
                    out.append(f"{indent}}} else {{")
                    self.block(f, dict(env), st.orelse, out, returns, indent + "    ")
                out.append(f"{indent}}}")
            else:
                self.fail(f, st, f"the statement `{type(st).__name__}` (loops, try, with, imports ... are outside "
                                 "the subset)")

    def truth(self, f, node, code, t):
        if t == BOOL:
            return code
        return f"(({code}) != 0)"

    def value(self, f, node, name):
        """The captured value `name` (closure, global or builtin), or fail."""
        if name in f.names:
            return f.names[name]
        if hasattr(builtins, name):
            return getattr(builtins, name)
        self.fail(f, node, f"the name `{name}` is not defined")

    def resolve(self, f, env, node):
        """The Python object an expression of names and attributes names (np.tanh, mods.where, a)."""
        if isinstance(node, ast.Name):
            if node.id in env:
                return None
            return self.value(f, node, node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(f, env, node.value)
            if base is None or not isinstance(base, pytypes.ModuleType):
                self.fail(f, node, f"the attribute `.{node.attr}` (only module attributes such as np.tanh are "
                                   "supported)")
            if not hasattr(base, node.attr):
                self.fail(f, node, f"module {base.__name__} has no attribute {node.attr!r}")
            return getattr(base, node.attr)
        return None

    def constant(self, f, node, v):
        if isinstance(v, (bool, np.bool_)):
            return ("true" if v else "false"), BOOL
        if isinstance(v, (int, np.integer)):
            try:
                return _int_literal(int(v)), INT
            except OverflowError:
                self.fail(f, node, f"the integer {v} does not fit in 64 bits")
        if isinstance(v, (float, np.floating)):
            return _float_literal(float(v)), FLOAT
        return None

    def expr(self, f, env, node) -> Tuple[str, str]:
        if isinstance(node, ast.Constant):
            r = self.constant(f, node, node.value)
            if r is None:
                self.fail(f, node, f"the constant {node.value!r} (only numbers and bools)")
            return r
        if isinstance(node, (ast.Name, ast.Attribute)):
            if isinstance(node, ast.Name) and node.id in env:
                return node.id, env[node.id]
            v = self.resolve(f, env, node)
            if id(v) in _KNOWN_CONSTANTS:
                return _float_literal(_KNOWN_CONSTANTS[id(v)]), FLOAT
            r = self.constant(f, node, v)
            if r is not None:
                self.key.append((ast.unparse(node), r[0]))
                return r
            if v is np.inf or v is math.inf:
                return "INFINITY", FLOAT
            if _is_array(v):
                self.fail(f, node, f"the array `{ast.unparse(node)}` is used whole; read one element, "
                                   f"`{ast.unparse(node)}[i]`")
            self.fail(f, node, f"`{ast.unparse(node)}` is a {type(v).__name__}; captured values must be numbers, "
                               "bools or arrays")
        if isinstance(node, ast.BinOp):
            return self.binop(f, env, node)
        if isinstance(node, ast.UnaryOp):
            code, t = self.expr(f, env, node.operand)
            if isinstance(node.op, ast.Not):
                return f"(!{self.truth(f, node, code, t)})", BOOL
            if isinstance(node.op, ast.Invert):
                return (f"(!{code})", BOOL) if t == BOOL else self._int_only(f, node, t, f"(~{code})")
            if isinstance(node.op, ast.USub):
                return f"(-{self.num(code, t)})", (INT if t == BOOL else t)
            return self.num(code, t), (INT if t == BOOL else t)
        if isinstance(node, ast.BoolOp):
            op = " && " if isinstance(node.op, ast.And) else " || "
            parts = []
            for v in node.values:
                code, t = self.expr(f, env, v)
                if t != BOOL:
                    self.fail(f, v, f"`{'and' if op == ' && ' else 'or'}` on {_a(t)}: in Python it returns one of "
                                    "its operands; compare first (x > 0 and ...)")
                parts.append(code)
            return "(" + op.join(parts) + ")", BOOL
        if isinstance(node, ast.Compare):
            parts = []
            left, _ = self.expr(f, env, node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right, _ = self.expr(f, env, right_node)
                sym = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}.get(type(op))
                if sym is None:
                    self.fail(f, node, f"the comparison `{type(op).__name__}` (is, in ... are outside the subset)")
                parts.append(f"({left} {sym} {right})")
                left = right
            return ("(" + " && ".join(parts) + ")" if len(parts) > 1 else parts[0]), BOOL
        if isinstance(node, ast.IfExp):
            c, ct = self.expr(f, env, node.test)
            return self.select(f, node, self.truth(f, node, c, ct), self.expr(f, env, node.body),
                               self.expr(f, env, node.orelse))
        if isinstance(node, ast.Call):
            return self.call(f, env, node)
        if isinstance(node, ast.Subscript):
            return self.subscript(f, env, node)
        self.fail(f, node, f"the expression `{type(node).__name__}` ({ast.unparse(node)})")

    def constant_number(self, f, env, node):
        """The value of an expression that is a number known now (a literal or a captured number), else None."""
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            v = self.constant_number(f, env, node.operand)
            return None if v is None else -v
        if isinstance(node, ast.Constant):
            v = node.value
        elif isinstance(node, ast.Name) and node.id not in env and node.id in f.names:
            v = f.names[node.id]
        else:
            return None
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        return v if ok else None

    def num(self, code, t):
        return f"((long long)({code}))" if t == BOOL else code

    def _int_only(self, f, node, t, code):
        if t != INT:
            self.fail(f, node, f"a bitwise operation on {_a(t)}")
        return code, INT

    def select(self, f, node, cond, a, b):
        (x, xt), (y, yt) = a, b
        t = _unify({xt, yt})
        if t is None:
            self.fail(f, node, f"the two choices have different types ({xt} and {yt})")
        return f"({cond} ? ({CTYPE[t]})({x}) : ({CTYPE[t]})({y}))", t

    def site(self, what, f, node, size=None) -> int:
        code = self.first_site + len(self.sites)
        line = f.first_line + node.lineno - 1
        self.sites[code] = Site(what, f.fn, line, ast.unparse(node), size)
        return code

    def binop(self, f, env, node):
        a, at = self.expr(f, env, node.left)
        b, bt = self.expr(f, env, node.right)
        op = type(node.op)
        if op in (ast.BitAnd, ast.BitOr, ast.BitXor):
            sym = {ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^"}[op]
            if at == BOOL and bt == BOOL:
                return f"((bool)({a} {sym} {b}))", BOOL
            if FLOAT in (at, bt):
                self.fail(f, node, f"`{sym}` on a float")
            return f"({self.num(a, at)} {sym} {self.num(b, bt)})", INT
        if op in (ast.LShift, ast.RShift):
            if FLOAT in (at, bt):
                self.fail(f, node, "a shift of a float")
            return f"({self.num(a, at)} {'<<' if op is ast.LShift else '>>'} {self.num(b, bt)})", INT
        t = FLOAT if FLOAT in (at, bt) else INT
        a, b = self.num(a, at), self.num(b, bt)
        if t == FLOAT:
            a, b = (x if tt == FLOAT else f"(float)({x})" for x, tt in ((a, at), (b, bt)))
        if op in (ast.Add, ast.Sub, ast.Mult):
            return f"({a} {'+' if op is ast.Add else '-' if op is ast.Sub else '*'} {b})", t
        if op in (ast.Div, ast.FloorDiv, ast.Mod):
            c = self.constant_number(f, env, node.right)
            constant_divisor = c is not None and c != 0
            code = 0 if constant_divisor else self.site("division", f, node)
            if op is ast.Div:
                if t == INT:
                    a, b = f"(float)({a})", f"(float)({b})"
                if constant_divisor:  # a multiply by the reciprocal (1 ulp), not a division per score
                    return f"({a} * {_float_literal(1.0 / float(c))})", FLOAT
                return f"fk_div({a}, {b}, {code}, ctx.pos)", FLOAT
            name = "fk_floordiv" if op is ast.FloorDiv else "fk_mod"
            return f"{name}({a}, {b}, {code}, ctx.pos)", t
        if op is ast.Pow:
            if isinstance(node.right, ast.Constant) and node.right.value == 2:
                return f"({a} * {a})", t
            if t == INT:
                self.fail(f, node, "`**` on ints other than x ** 2 (write float(x) ** y)")
            return f"powf({a}, {b})", FLOAT
        self.fail(f, node, f"the operator `{type(node.op).__name__}`")

    def call(self, f, env, node):
        if node.keywords:
            self.fail(f, node, "keyword arguments in a call")
        target = self.resolve(f, env, node.func)
        if target is None:
            self.fail(f, node, f"a call of `{ast.unparse(node.func)}`, which is not a function")
        args = [self.expr(f, env, a) for a in node.args]
        known = _KNOWN.get(id(target))
        if known is not None:
            return self.builtin(f, node, known, args)
        py = blockmask.python_function(target)
        if isinstance(py, pytypes.FunctionType):
            name, rtype = self.function(target, tuple(t for _, t in args))
            return f"{name}({', '.join(['ctx'] + [c for c, _ in args])})", rtype
        self.fail(f, node, f"a call of `{ast.unparse(node.func)}` ({type(target).__name__}): only the functions "
                           "listed in flashkit.gpu.modlang and Python functions in the subset")

    def builtin(self, f, node, name, args):
        n = len(args)

        def need(k):
            if n != k:
                self.fail(f, node, f"{name}() takes {k} argument{'s' if k != 1 else ''} here; got {n}")

        if name in _UNARY_FLOAT:
            need(1)
            (x, t), = args
            return f"{_UNARY_FLOAT[name]}({x if t == FLOAT else f'(float)({x})'})", FLOAT
        if name == "sign":  # (the derivative of abs, flashkit.mods_grad)
            need(1)
            (x, t), = args
            return f"fk_sign((float)({x}))", FLOAT
        if name == "abs":
            need(1)
            (x, t), = args
            return (f"fabsf({x})", FLOAT) if t == FLOAT else (f"llabs({self.num(x, t)})", INT)
        if name in ("min", "max"):
            if n < 2:
                self.fail(f, node, f"{name}() of fewer than two numbers")
            t = FLOAT if any(tt == FLOAT for _, tt in args) else INT
            code = self.num(*args[0]) if t == INT else f"(float)({args[0][0]})"
            for x, xt in args[1:]:
                x = self.num(x, xt) if t == INT else f"(float)({x})"
                code = f"fk_{name}({code}, {x})"
            return code, t
        if name == "where":
            need(3)
            (c, ct), a, b = args
            return self.select(f, node, self.truth(f, node, c, ct), a, b)
        if name in ("int", "float", "bool"):
            need(1)
            (x, t), = args
            if name == "int":
                return (f"((long long)truncf({x}))" if t == FLOAT else self.num(x, t)), INT
            if name == "float":
                return f"(float)({x})", FLOAT
            return self.truth(f, node, x, t), BOOL
        self.fail(f, node, f"the function {name}")

    def subscript(self, f, env, node):
        arr = self.resolve(f, env, node.value) if isinstance(node.value, (ast.Name, ast.Attribute)) else None
        if arr is None or not _is_array(arr):
            self.fail(f, node, f"`{ast.unparse(node.value)}[...]`: only captured NumPy or CuPy arrays can be indexed")
        idx = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if arr.ndim == 0 or len(idx) != arr.ndim:
            self.fail(f, node, f"`{ast.unparse(node.value)}` has {arr.ndim} dimensions; index it with {arr.ndim} "
                               "integers (no slices)")
        cap = self.capture(f, node, ast.unparse(node.value), arr)
        strides = [int(np.prod(arr.shape[k + 1:], dtype=np.int64)) for k in range(arr.ndim)]
        terms = []
        for k, (i, stride) in enumerate(zip(idx, strides)):
            if isinstance(i, ast.Slice):
                self.fail(f, node, "a slice (read one element at a time)")
            code, t = self.expr(f, env, i)
            if t != INT:
                self.fail(f, i, f"the index `{ast.unparse(i)}` is {_a(t)}; array indices must be integers")
            site = self.site("lookup", f, node, int(arr.shape[k]))
            ix = f"fk_ix({code}, {int(arr.shape[k])}LL, {site}, ctx.pos)"
            terms.append(ix if stride == 1 else f"{ix} * {stride}LL")
        load = f"ctx.{cap.param}[{' + '.join(terms)}]"
        kind = arr.dtype.kind
        return (f"({load} != 0)", BOOL) if kind == "b" else ((f"(long long)({load})", INT) if kind in "iu"
                                                              else (load, FLOAT))

    def capture(self, f, node, name, arr) -> Capture:
        for c in self.arrays:
            if c.value is arr:
                return c
        kind = arr.dtype.kind
        if kind == "b":
            ctype = "unsigned char"
        elif kind in "iu":
            ctype = "int" if arr.dtype.itemsize < 8 or _fits_int32(arr) else "long long"
        elif kind == "f":
            ctype = "float"
        else:
            self.fail(f, node, f"the array `{name}` has dtype {arr.dtype}; captured arrays hold numbers or bools")
        c = Capture(f"{self.prefix}_a{len(self.arrays)}", name, arr, ctype, tuple(int(s) for s in arr.shape))
        self.arrays.append(c)
        self.key.append(("array", c.param, c.ctype, c.shape))
        return c


def _generated_def(text: str, name: str) -> Optional[List[str]]:
    """The lines of the def of `name` in generated source text (None if it is not there)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return [ln + "\n" for ln in ast.unparse(node).splitlines()]
    return None


def _has_contents(cell) -> bool:
    try:
        return cell.cell_contents is not cell  # reading an empty cell raises
    except ValueError:
        return False


def _fits_int32(arr) -> bool:
    if arr.size == 0:
        return True
    lo, hi = arr.min(), arr.max()
    return int(lo) >= -(1 << 31) and int(hi) < (1 << 31)


def _a(t: str) -> str:
    return {BOOL: "a bool", INT: "an int", FLOAT: "a float"}[t]


def _unify(types_) -> Optional[str]:
    types_ = set(types_)
    if len(types_) == 1:
        return next(iter(types_))
    if BOOL in types_ and FLOAT not in types_:
        return INT if types_ == {BOOL, INT} else None
    if types_ <= {INT, FLOAT}:
        return FLOAT
    if types_ == {BOOL, INT, FLOAT} or types_ == {BOOL, FLOAT}:
        return FLOAT
    return None


def _cast_returns(body: str, ctype: str) -> str:
    out = []
    for line in body.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("return ") and stripped.endswith(";"):
            indent = line[: len(line) - len(stripped)]
            line = f"{indent}return ({ctype})({stripped[7:-1]});"
        out.append(line)
    return "\n".join(out)


def _always_returns(stmts) -> bool:
    if not stmts:
        return False
    last = stmts[-1]
    if isinstance(last, ast.Return):
        return True
    if isinstance(last, ast.If):
        return _always_returns(last.body) and _always_returns(last.orelse)
    return False


_CACHE: Dict[tuple, DeviceCode] = {}


def translate(kind: str, fn, prefix: Optional[str] = None) -> DeviceCode:
    """`fn` (a score_mod or a mask_mod) as a CUDA device function; UnsupportedMod outside the subset or
    when it returns the wrong type (a mask_mod a bool, a score_mod a number). `prefix` names its C
    functions (default fks_ / fkm_, what rung 6's hooks call)."""
    if kind not in ("score_mod", "mask_mod"):
        raise ValueError(f"kind must be 'score_mod' or 'mask_mod'; got {kind!r}")
    prefix = prefix or ("fks" if kind == "score_mod" else "fkm")
    # The code depends on the captured arrays' shapes, dtypes and identities (their contents are kernel
    # arguments), on the captured numbers (baked in), and on whether a 64-bit int array fits int32.
    key = (kind, fn, blockmask.fingerprint(fn, contents=False), prefix)
    try:
        hit = _CACHE.get(key)
    except TypeError:  # an unhashable capture: translate again
        key = hit = None
    if hit is not None and all(_fits_int32(a.value) for a in hit.arrays
                               if a.ctype == "int" and isinstance(a.value, np.ndarray) and a.value.dtype.itemsize == 8):
        return hit
    tr = Translator(kind, fn, prefix, FIRST_SITE if kind == "score_mod" else MASK_SITES)
    args = (FLOAT, INT, INT, INT, INT) if kind == "score_mod" else (INT, INT, INT, INT)
    inner, rtype = tr.function(fn, args)
    if kind == "mask_mod" and rtype != BOOL:
        raise UnsupportedMod(f"mask_mod {blockmask.describe(fn)} must return a bool (True = may attend); it returns "
                             f"{_a(rtype)}")
    if kind == "score_mod" and rtype == BOOL:
        raise UnsupportedMod(f"score_mod {blockmask.describe(fn)} returns a bool: a score_mod returns the modified "
                             "score (a number); to hide scores, pass a mask_mod")
    code = _device_code(kind, fn, prefix, tr, inner, "score, " if kind == "score_mod" else "")
    if key is not None:
        _CACHE[key] = code
    return code


def _device_code(kind, fn, prefix, tr, inner, call) -> DeviceCode:
    """The DeviceCode of a translated mod: its context struct, its functions, and the entry the kernel calls
    (inner(ctx, <call>b, h, q_idx, kv_idx))."""
    ctx_fields = "".join(f" const {a.ctype}* {a.param};" for a in tr.arrays)
    ctx = f"struct {prefix}_ctx {{ fk_pos pos;{ctx_fields} }};"
    head = "float score, " if kind != "mask_mod" else ""
    ret = "float" if kind != "mask_mod" else "bool"
    entry = f"{prefix}_{kind}"
    params = "".join(f", const {a.ctype}* __restrict__ {a.param}" for a in tr.arrays)
    init = "".join(f", {a.param}" for a in tr.arrays)
    top = (f"// the {kind}, as the kernel calls it\n"
           f"__device__ __forceinline__ {ret} {entry}({head}long long b, long long h, long long q_idx, "
           f"long long kv_idx, int* fk_err{params}) {{\n"
           f"    const {prefix}_ctx ctx{{{{fk_err, (int)b, (int)h, (int)q_idx, (int)kv_idx}}{init}}};\n"
           f"    return ({ret})({inner}(ctx, {call}b, h, q_idx, kv_idx));\n}}")
    source = "\n\n".join([ctx] + tr.functions + [top]) + "\n"
    if kind == "mask_mod":
        safe = not tr.sites
    else:  # a score_mod (or its derivative) may also return NaN or +inf: only a declaration rules that out
        safe = mods.declared_cannot_fail(fn)
    return DeviceCode(kind, fn, prefix, entry, source, tr.arrays, tr.sites,
                      key=(kind, source, tuple((a.ctype, a.shape) for a in tr.arrays)), cannot_fail=safe)


def translate_derivative(score_mod, prefix: str = "fkd") -> DeviceCode:
    """d score_mod / d score as a CUDA device function `<prefix>_score_grad(score, b, h, q_idx, kv_idx,
    err, arrays...)`: flashkit.mods_grad.derivative writes the derivative as Python (NotDifferentiable
    outside its subset), translated here like a score_mod. What a backward kernel with a score_mod needs
    for dS = P (dP - D) f'(s). Not yet called by a GPU kernel (the GPU backward takes no mods yet)."""
    from flashkit import mods_grad

    key = ("score_grad", score_mod, blockmask.fingerprint(score_mod, contents=False), prefix)
    try:
        hit = _CACHE.get(key)
    except TypeError:
        key = hit = None
    if hit is not None and all(_fits_int32(a.value) for a in hit.arrays
                               if a.ctype == "int" and isinstance(a.value, np.ndarray) and a.value.dtype.itemsize == 8):
        return hit
    wrapped = mods_grad.derivative(score_mod)
    # the derivative with the score's own tangent as a sixth argument (mods_grad's wrapper passes 1.0)
    tangent_fn = wrapped.__globals__[wrapped.__name__[: -len("_wrt_score")]]
    tr = Translator("d score_mod / d score", score_mod, prefix, GRAD_SITES)
    inner, rtype = tr.function(tangent_fn, (FLOAT, INT, INT, INT, INT, FLOAT))
    if rtype == BOOL:
        raise UnsupportedMod(f"the derivative of score_mod {blockmask.describe(score_mod)} is a bool")
    code = _device_code("score_grad", score_mod, prefix, tr, f"{inner}", "score, ")
    # the tangent 1.0 as the last argument of the inner call
    code.source = code.source.replace(f"({inner}(ctx, score, b, h, q_idx, kv_idx))",
                                      f"({inner}(ctx, score, b, h, q_idx, kv_idx, 1.0f))")
    code.key = ("score_grad", code.source, code.key[2])
    if key is not None:
        _CACHE[key] = code
    return code


# Helpers every generated function may call (Python's meaning of //, %, / and of a negative index).
RUNTIME = r"""
// ---- flashkit.gpu.modlang runtime: Python's semantics for what a mod may do -------------------------
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
// err[0]: 0, or the code of the first failure (a lookup or division site, or NONFINITE); err[1..4] the
// position (b, h, q_idx, kv_idx); err[5..6] the index (or the value's bits), low and high words.
struct fk_pos { int* err; int b, h, q, kv; };  // the error word and the position being computed
// Inlined, not called: a call in the kernel's unrolled loops made every score pay for the ABI (measured:
// identity 2.2x the time without a mod); err == nullptr: a hidden position, whose errors do not count.
__device__ __forceinline__ void fk_fail(const fk_pos& p, int code, long long v) {
    int* err = p.err;
    if (err != nullptr && atomicCAS(err, 0, code) == 0) {
        err[1] = p.b, err[2] = p.h, err[3] = p.q, err[4] = p.kv;
        err[5] = (int)(v & 0xffffffffLL);
        err[6] = (int)(v >> 32);
        __threadfence();
    }
}
__device__ __forceinline__ long long fk_ix(long long i, long long n, int site, const fk_pos& err) {
    const long long k = i < 0 ? i + n : i;  // a negative index counts from the end, as in Python
    const bool out = k < 0 || k >= n;
    if (out) fk_fail(err, site, i);
    return out ? 0 : k;  // never a read outside the array
}
__device__ __forceinline__ float fk_div(float a, float b, int site, const fk_pos& err) {
    if (site && b == 0.f) fk_fail(err, site, 0);
#ifdef __CUDA_ARCH__
    return __fdividef(a, b);  // 2 ulp, a fraction of IEEE division's instructions
#else
    return a / b;
#endif
}
__device__ __forceinline__ long long fk_floordiv(long long a, long long b, int site, const fk_pos& err) {
    if (b == 0) { if (site) fk_fail(err, site, 0); return 0; }
    const long long q = a / b;
    return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}
__device__ __forceinline__ float fk_floordiv(float a, float b, int site, const fk_pos& err) {
    if (site && b == 0.f) fk_fail(err, site, 0);
    return floorf(a / b);
}
__device__ __forceinline__ long long fk_mod(long long a, long long b, int site, const fk_pos& err) {
    if (b == 0) { if (site) fk_fail(err, site, 0); return 0; }
    const long long r = a % b;
    return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
__device__ __forceinline__ float fk_mod(float a, float b, int site, const fk_pos& err) {
    if (site && b == 0.f) fk_fail(err, site, 0);
    return a - b * floorf(a / b);
}
__device__ __forceinline__ long long fk_min(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ long long fk_max(long long a, long long b) { return a > b ? a : b; }
__device__ __forceinline__ float fk_min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ float fk_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ float fk_sign(float x) { return (float)((x > 0.f) - (x < 0.f)); }
// tanh(x) in one instruction (tanh.approx.f32, sm_75 and later: relative error about 2^-11, the size of
// the fp16 rounding P gets anyway; FlashAttention's softcap uses the same instruction). The formula it
// replaced, 1 - 2 / (exp2(2x log2 e) + 1), took two of the SM's 16-a-clock special-function operations per
// score (ex2, rcp) on top of the softmax's own ex2, and measured 1.19-1.45x the time without a score_mod.
__device__ __forceinline__ float fk_tanh(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#elif defined(__CUDA_ARCH__)
    return tanhf(x);
#else  // the tests run the translated mods on the CPU too (tests/test_gpu_modlang.py)
    return std::tanh(x);
#endif
}
"""
