"""d score_mod / d score, exactly: the derivative written as Python from the function's own source.

The backward of attention with a score_mod needs, for every visible score s, the derivative f'(s) of
the modified score f(s) = score_mod(s, b, h, q_idx, kv_idx): dS = P * (dP - D) * f'(s) (chain rule
through the softmax's input). `derivative(score_mod)` reads the function's source with `ast`, and
writes a second function of the same five arguments that returns f'(s), by forward-mode
differentiation of each statement (every value that depends on the score gets a twin `_d_<name>`
holding its derivative). The result is ordinary Python over the same operations, so the three
evaluators of a mod (NumPy on index grids, Python per score, Numba compiled) all run it.

What it differentiates (the subset flashkit's mods use; the GPU translator of flashkit/modlang.py has
its own reading of the same subset):

    + - * / ** and unary -, on numbers and arrays          the usual rules
    np.exp np.log np.tanh np.sqrt np.abs abs np.sin np.cos  their derivatives (math.* the same)
    np.maximum np.minimum max min (two arguments)           the derivative of the chosen argument
    np.where(c, x, y), mods.where, x if c else y, if/else    the derivative of the branch taken
    comparisons, & | ~ and or not, % //, int() and indexing  zero: they do not vary with the score
    a call of another Python function                       differentiated the same way (soft_cap)
    local assignments (x = ..., x += ...), return            followed statement by statement

Anything else that depends on the score (a loop, an unknown function given the score, a method call,
a score used as an index) raises `NotDifferentiable` naming the construct, the function and the line;
a part that does not depend on the score is copied as it is, whatever it is.
"""
from __future__ import annotations

import ast
import builtins
import itertools
import linecache
import math
import types

import numpy as np

from flashkit import blockmask, mods

__all__ = ["NotDifferentiable", "derivative"]


class NotDifferentiable(TypeError):
    """A score_mod whose derivative with respect to the score flashkit cannot write."""


# The derivative of f(u) with respect to u, as a Python expression of `u` and the namespace's names
# (np is NumPy): d f(u) = D[f](u) * du.
_UNARY = {
    "exp": "{f}(u)", "log": "1.0 / u", "tanh": "1.0 - {f}(u) ** 2", "sqrt": "0.5 / {f}(u)",
    "sin": "_np.cos(u)", "cos": "-_np.sin(u)", "abs": "_np.sign(u)", "fabs": "_np.sign(u)",
    "absolute": "_np.sign(u)", "float": "1.0", "float32": "1.0", "float64": "1.0", "log2": "1.0 / (u * 0.6931471805599453)",
    "exp2": "0.6931471805599453 * {f}(u)", "expm1": "_np.exp(u)", "log1p": "1.0 / (1.0 + u)",
}
_ZERO_CALLS = {"int", "int32", "int64", "floor", "ceil", "round", "trunc", "sign", "bool", "bool_", "isfinite",
               "isnan", "isinf", "floor_divide", "logical_and", "logical_or", "logical_not", "equal",
               "less", "greater", "less_equal", "greater_equal", "not_equal", "rint"}
_SELECT = {"maximum": ">=", "minimum": "<=", "fmax": ">=", "fmin": "<=", "max": ">=", "min": "<="}
_NUMERIC_MODULES = (np, math)


def _module_function(value):
    """'tanh' for np.tanh / math.tanh / builtins, else None."""
    name = getattr(value, "__name__", None)
    if name is None:
        return None
    if value is abs or value is max or value is min or value is float or value is int or value is round:
        return name
    for mod in _NUMERIC_MODULES:
        if getattr(mod, name, None) is value:
            return name
    if isinstance(value, type) and issubclass(value, np.generic):
        return name
    return None


class _Writer:
    """The derivative of one function, for one set of arguments that carry a derivative."""

    def __init__(self, fn, active_args, owner):
        self.fn = blockmask.python_function(fn)
        self.owner = owner
        self.name = getattr(self.fn, "__qualname__", repr(fn))
        self.tree, self.first_line = _function_ast(self.fn)
        self.args = [a.arg for a in self.tree.args.args]
        self.active = {self.args[i] for i in active_args}
        self.namespace = dict(self.fn.__globals__)
        for var, cell in zip(self.fn.__code__.co_freevars, self.fn.__closure__ or ()):
            try:
                self.namespace[var] = cell.cell_contents
            except ValueError:
                pass

    def fail(self, node, what):
        line = self.first_line + getattr(node, "lineno", 1) - 1
        raise NotDifferentiable(f"score_mod {blockmask.describe(self.owner)}: cannot differentiate {what} "
                                f"({self.name}, line {line}: {ast.unparse(node)[:80]!r}) with respect to the "
                                "score. " + _SUBSET)

    # ---------------------------------------------------------------- expressions: (value, derivative)
    def d(self, node):
        """The derivative of expression `node` as an AST expression, or None where it is zero."""
        if isinstance(node, ast.Name):
            return ast.Name(f"_d_{node.id}", ast.Load()) if node.id in self.active else None
        if isinstance(node, ast.Constant):
            return None
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            return None
        if isinstance(node, ast.UnaryOp):
            du = self.d(node.operand)
            if du is None or isinstance(node.op, (ast.Not, ast.Invert)):
                return None
            return du if isinstance(node.op, ast.UAdd) else ast.UnaryOp(ast.USub(), du)
        if isinstance(node, ast.BinOp):
            return self.binop(node)
        if isinstance(node, ast.IfExp):
            da, db = self.d(node.body), self.d(node.orelse)
            if da is None and db is None:
                return None
            return ast.IfExp(node.test, da or _zero(), db or _zero())
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Subscript):
            if self.d(node.value) is not None:
                self.fail(node, "an index into a value that depends on the score")
            return None  # the index may depend on the score; the entry read does not vary smoothly with it
        if isinstance(node, ast.Attribute):
            if self.d(node.value) is not None:
                self.fail(node, "an attribute of the score")
            return None
        if isinstance(node, ast.Tuple):
            if any(self.d(e) is not None for e in node.elts):
                self.fail(node, "a tuple holding the score")
            return None
        if any(self.d(child) is not None for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr)):
            self.fail(node, f"a {type(node).__name__}")
        return None

    def binop(self, node):
        a, b, op = node.left, node.right, node.op
        da, db = self.d(a), self.d(b)
        if da is None and db is None:
            return None
        if isinstance(op, (ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift, ast.FloorDiv)):
            return None  # booleans and integers: steps, derivative 0 wherever it exists
        if isinstance(op, (ast.Add, ast.Sub)):
            if db is None:
                return da
            if da is None:
                return db if isinstance(op, ast.Add) else ast.UnaryOp(ast.USub(), db)
            return ast.BinOp(da, op, db)
        if isinstance(op, ast.Mod):  # a % m: slope 1 in a between the jumps; m must not depend on the score
            if db is not None:
                self.fail(node, "a % m with m depending on the score")
            return da
        if isinstance(op, ast.Mult):  # d(a b) = da b + a db
            terms = [t for t in (da and ast.BinOp(da, ast.Mult(), b), db and ast.BinOp(a, ast.Mult(), db)) if t]
            return terms[0] if len(terms) == 1 else ast.BinOp(terms[0], ast.Add(), terms[1])
        if isinstance(op, ast.Div):  # d(a / b) = da / b - a db / b^2
            first = da and ast.BinOp(da, ast.Div(), b)
            if db is None:
                return first
            second = ast.BinOp(ast.BinOp(a, ast.Mult(), db), ast.Div(), ast.BinOp(b, ast.Mult(), b))
            return ast.BinOp(first, ast.Sub(), second) if first else ast.UnaryOp(ast.USub(), second)
        if isinstance(op, ast.Pow):
            if db is None:  # d(a^n) = n a^(n-1) da
                return ast.BinOp(ast.BinOp(b, ast.Mult(), ast.BinOp(a, ast.Pow(), ast.BinOp(b, ast.Sub(), _one()))),
                                 ast.Mult(), da)
            # d(a^b) = a^b (db log a + b da / a)
            log_a = _call("_np.log", a)
            inner = ast.BinOp(db, ast.Mult(), log_a)
            if da is not None:
                inner = ast.BinOp(inner, ast.Add(), ast.BinOp(ast.BinOp(b, ast.Mult(), da), ast.Div(), a))
            return ast.BinOp(ast.BinOp(a, ast.Pow(), b), ast.Mult(), inner)
        self.fail(node, f"the operator {type(op).__name__}")

    def call(self, node):
        if node.keywords:
            if any(self.d(k.value) is not None for k in node.keywords):
                self.fail(node, "a call with keyword arguments")
        darg = [self.d(a) for a in node.args]
        if all(x is None for x in darg):
            return None  # nothing that varies with the score goes in
        target = self.resolve(node.func)
        name = _module_function(target)
        if name in _ZERO_CALLS:
            return None
        if name in _UNARY and len(node.args) == 1:
            rule = ast.parse(_UNARY[name].format(f="_fn"), mode="eval").body
            rule = _Substitute({"u": node.args[0], "_fn": node.func}).visit(rule)
            return ast.BinOp(rule, ast.Mult(), darg[0])
        if name in _SELECT and len(node.args) == 2:
            cmp = {">=": ast.GtE(), "<=": ast.LtE()}[_SELECT[name]]
            test = ast.Compare(node.args[0], [cmp], [node.args[1]])
            return _where(test, darg[0] or _zero(), darg[1] or _zero())
        if target is np.where or _is_mods_where(target):
            if len(node.args) != 3 or darg[0] is not None:
                self.fail(node, "np.where with a condition that is not a comparison")
            return _where(node.args[0], darg[1] or _zero(), darg[2] or _zero())
        if isinstance(target, types.FunctionType) or hasattr(target, "py_func"):
            active = tuple(i for i, x in enumerate(darg) if x is not None)
            helper = self.owner_writer.helper(target, active)
            args = list(node.args) + [darg[i] for i in active]
            return ast.Call(ast.Name(helper, ast.Load()), args, [])
        self.fail(node, f"a call of {ast.unparse(node.func)}, which flashkit has no derivative for")

    def resolve(self, func):
        """The object a call's function expression names (np.tanh, soft_cap, ...), or None."""
        if isinstance(func, ast.Name):
            return self.namespace.get(func.id, getattr(builtins, func.id, None))
        if isinstance(func, ast.Attribute):
            base = self.resolve(func.value)
            return getattr(base, func.attr, None) if base is not None else None
        return None

    # ---------------------------------------------------------------- statements
    def statements(self, body):
        out = []
        for stmt in body:
            out += self.statement(stmt)
        return out

    def statement(self, stmt):
        if isinstance(stmt, ast.Return):
            if stmt.value is None:
                self.fail(stmt, "a return without a value")
            dv = self.d(stmt.value)
            return [ast.Return(dv or _zero())]
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            if isinstance(stmt, ast.AugAssign):
                value = ast.BinOp(ast.Name(stmt.target.id, ast.Load()), stmt.op, stmt.value) \
                    if isinstance(stmt.target, ast.Name) else None
                targets = [stmt.target]
            else:
                value, targets = stmt.value, (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
            if value is None or not all(isinstance(t, ast.Name) for t in targets):
                if value is not None and self.d(value) is None:
                    return [stmt]  # unpacking of values that do not depend on the score
                self.fail(stmt, "an assignment to something other than a name")
            dv = self.d(value)
            out = []
            for t in targets:
                if dv is None:
                    self.active.discard(t.id)
                else:
                    out.append(ast.Assign([ast.Name(f"_d_{t.id}", ast.Store())], dv))
                    self.active.add(t.id)
            return out + [stmt]  # the derivative first: it may read the old value (x = x * x)
        if isinstance(stmt, ast.If):
            before = set(self.active)
            body = self.statements(stmt.body)
            after_body, self.active = self.active, set(before)
            orelse = self.statements(stmt.orelse)
            after_else = self.active
            self.active = after_body | after_else
            # a name that carries a derivative on one side only gets 0 on the other
            for branch, active in ((body, after_body), (orelse, after_else)):
                for name in sorted(self.active - active):
                    if not _returns(branch):
                        branch.append(ast.Assign([ast.Name(f"_d_{name}", ast.Store())], _zero()))
            return [ast.If(stmt.test, body or [ast.Pass()], orelse)]
        if isinstance(stmt, (ast.Expr, ast.Pass, ast.Raise, ast.Assert)):
            return [stmt]
        self.fail(stmt, f"a {type(stmt).__name__} statement")

    def function_def(self, new_name):
        """The derivative as an ast.FunctionDef: the original arguments, then one derivative per active one."""
        active_in = [a for a in self.args if a in self.active]
        body = self.statements(self.tree.body)
        if not _returns(body):
            body.append(ast.Return(_zero()))
        args = ast.arguments(posonlyargs=[], args=[ast.arg(a) for a in self.args + [f"_d_{a}" for a in active_in]],
                             kwonlyargs=[], kw_defaults=[], defaults=[])
        return _function_node(new_name, args, body)


def _function_node(name, args, body):
    extra = {"type_params": []} if "type_params" in ast.FunctionDef._fields else {}  # Python >= 3.12
    return ast.FunctionDef(name=name, args=args, body=body, decorator_list=[], returns=None, **extra)


def _returns(body):
    return bool(body) and isinstance(body[-1], (ast.Return, ast.Raise))


class _Substitute(ast.NodeTransformer):
    def __init__(self, names):
        self.names = names

    def visit_Name(self, node):
        return self.names.get(node.id, node)


def _zero():
    return ast.Constant(0.0)


def _one():
    return ast.Constant(1)


def _call(path, *args):
    return ast.Call(ast.parse(path, mode="eval").body, list(args), [])


def _where(test, x, y):
    return _call("_where", test, x, y)


def _is_mods_where(target):
    return target is mods.where


_SUBSET = ("flashkit differentiates arithmetic, np.exp/log/tanh/sqrt/abs, np.maximum/minimum, np.where/mods.where, "
           "if/else and calls of such Python functions; comparisons, & |, % // and indexing have derivative 0.")


def _function_ast(fn):
    """(ast.FunctionDef, the line it starts on) of a Python function, a lambda made a FunctionDef: the
    node of the whole file (or notebook cell, which IPython keeps in linecache) that starts on the
    function's first line."""
    code = fn.__code__
    lines = linecache.getlines(code.co_filename, fn.__globals__)
    try:
        tree = ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        tree = None
    if tree is None or not lines:
        raise NotDifferentiable(f"score_mod {blockmask.describe(fn)}: its source is not available (defined by "
                                "exec or at an interactive prompt?), so flashkit cannot write its derivative")
    first = code.co_firstlineno

    def starts(n):
        return min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) == first

    if code.co_name == "<lambda>":
        found = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda) and n.lineno == first
                 and [a.arg for a in n.args.args] == list(code.co_varnames[:code.co_argcount])]
        if len(found) > 1:  # several lambdas with these arguments on the line: the one whose bytecode matches
            found = [n for n in found if _lambda_code(n).co_code == code.co_code] or found
        if len(found) != 1:
            raise NotDifferentiable(f"score_mod {blockmask.describe(fn)}: cannot tell which lambda of line {first} "
                                    "it is; write it with def")
        return _function_node(code.co_name, found[0].args, [ast.Return(found[0].body)]), 1
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name == code.co_name and starts(n)]
    if len(defs) != 1:
        raise NotDifferentiable(f"score_mod {blockmask.describe(fn)}: its source could not be found as a def "
                                f"on line {first} of {code.co_filename}")
    return defs[0], 1


def _lambda_code(node):
    """The code object of a lambda's AST, compiled alone (to tell apart two lambdas on one line)."""
    code = compile(ast.fix_missing_locations(ast.Expression(node)), "<lambda>", "eval")
    return next(c for c in code.co_consts if isinstance(c, types.CodeType))


class _Derivative:
    """Writes the derivative of the top-level score_mod and of every function it calls (helpers)."""

    _count = itertools.count()

    def __init__(self, score_mod):
        self.owner = score_mod
        self.helpers = {}  # (id of function, active args) -> (name, python function)
        self.namespace = {"_np": np, "_where": mods.where}

    def helper(self, fn, active):
        key = (id(blockmask.python_function(fn)), active)
        if key not in self.helpers:
            name = f"_d{next(self._count)}_{_identifier(blockmask.python_function(fn).__name__)}"
            self.helpers[key] = (name, None)
            self.helpers[key] = (name, self.write(fn, active, name))
        return self.helpers[key][0]

    def write(self, fn, active, name):
        w = _Writer(fn, active, self.owner)
        w.owner_writer = self
        tree = w.function_def(name)
        module = ast.fix_missing_locations(ast.Module([tree], type_ignores=[]))
        namespace = dict(w.namespace, **self.namespace)
        exec(compile(module, f"<derivative of {w.name}>", "exec"), namespace)  # noqa: S102  (our own AST)
        made = namespace[name]
        made.__flashkit_source__ = ast.unparse(tree)
        self.namespace[name] = made
        for _, helper in self.helpers.values():  # helpers see each other and themselves
            if helper is not None:
                helper.__globals__.update({k: v for k, v in self.namespace.items() if k.startswith("_d")})
        made.__globals__.update({k: v for k, v in self.namespace.items() if k.startswith("_d")})
        return made


_MADE = {}


def derivative(score_mod):
    """d score_mod / d score as a Python function of (score, b, h, q_idx, kv_idx), written from its
    source (see the module docstring); NotDifferentiable (a TypeError) if it leaves the subset. The
    function's source is in `.__flashkit_source__`. Kept per function."""
    key = (id(blockmask.python_function(score_mod)), blockmask.fingerprint(score_mod))
    hit = _MADE.get(key)
    if hit is not None and hit[0] is blockmask.python_function(score_mod):
        return hit[1]
    made = _Derivative(score_mod)
    fn = made.write(score_mod, (0,), "d_" + _identifier(blockmask.python_function(score_mod).__name__))
    wrapped = _with_unit_tangent(fn)
    wrapped.__flashkit_source__ = "\n\n".join(h.__flashkit_source__ for _, h in made.helpers.values()) + \
        ("\n\n" if made.helpers else "") + fn.__flashkit_source__
    _MADE[key] = (blockmask.python_function(score_mod), wrapped)
    return wrapped


def _identifier(name):
    """A Python name made of `name` ('<lambda>' -> 'lambda')."""
    return "".join(c if c.isalnum() or c == "_" else "" for c in name) or "mod"


def _with_unit_tangent(fn):
    """score_mod's derivative with the score's own derivative 1 (the generated function takes it as its
    sixth argument)."""
    source = f"def {fn.__name__}_wrt_score(score, b, h, q_idx, kv_idx):\n    return {fn.__name__}(score, b, h, q_idx, kv_idx, 1.0)\n"
    namespace = {fn.__name__: fn}
    exec(source, namespace)  # noqa: S102
    made = namespace[f"{fn.__name__}_wrt_score"]
    made.__qualname__ = f"d({fn.__name__[2:]})/d score"
    return made
