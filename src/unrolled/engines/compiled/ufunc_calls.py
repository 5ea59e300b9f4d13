"""An elementwise op's formula as NumPy calls with ``out=``, derived from the op table.

The step loops (codegen.py) and the sampler's NumPy path (feedback.py) write an elementwise op
as a few ufunc calls into the buffer that holds its value or gradient, with no temporary:
``tanh``'s VJP ``g * (1 - y * y)`` becomes ``multiply(y, y, out=d); subtract(1.0, d, out=d);
multiply(d, g, out=d)``. The same text runs on NumPy and, with the array kernels standing in
for the ufuncs, under Numba. :func:`spell` derives these calls from the op's formula
(``ops.Formula``), so no path keeps a copy of an op's rule.

Only formulas that fit in one buffer have a spelling: each sum, difference or call has at most
one compound operand, each product at most one compound factor. A product's compound factor is
computed first, then multiplied by the others from right to left (so ``g``, a VJP's first
factor, comes last). A formula without a spelling (softplus: ``max(x, 0) + log1p(exp(-|x|))``
needs a second buffer) gets ``None``, and the loop runs the op through a fused kernel rendered
from the same formula (fuse.py) or the table's NumPy rule.
"""

from __future__ import annotations

import ast

_BINARY = {ast.Add: "add", ast.Sub: "subtract", ast.Mult: "multiply"}


class _NoSpelling(Exception):
    """The formula needs more than one buffer, or a call the path has no spelling of."""


def spell(formula: str, names: dict[str, str], dst: str, calls: dict[str, str],
          mask: str | None = None) -> list[str] | None:
    """The statements that write ``formula`` into ``dst``; None where it has no spelling.

    ``names`` maps the formula's names (``x0``, ``y``, ``g``, ``c``) to expressions; ``calls``
    maps each function of ``ops.FUNCTIONS`` the path spells to a template over its operands
    ``{0}``, ``{1}`` and ``{dst}``; ``mask``, a boolean buffer, lets a choice
    ``(a if x > b else 0)`` be spelled as ``a * (x > b)``."""
    try:
        return _Speller(names, calls, mask).into(ast.parse(formula, mode="eval").body, dst)
    except _NoSpelling:
        return None


class _Speller:
    def __init__(self, names, calls, mask):
        self.names, self.calls, self.mask = names, calls, mask

    def leaf(self, node) -> str | None:
        """The expression of a name or a constant ``K(v)``; None for anything compound."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id, node.id)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "K":
            return self.leaf(node.args[0]) if isinstance(node.args[0], ast.Name) else ast.unparse(node.args[0])
        return None

    def into(self, node, dst: str) -> list[str]:
        if self.leaf(node) is not None:
            return [f"copyto({dst}, {self.leaf(node)})"]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return self.product(node, dst)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self.apply(_BINARY[type(node.op)] + "({0}, {1}, out={dst})", [node.left, node.right], dst)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return self.apply("negative({0}, out={dst})", [node.operand], dst)
        if isinstance(node, ast.Call) and node.func.id in self.calls:
            return self.apply(self.calls[node.func.id], node.args, dst)
        if isinstance(node, ast.IfExp) and self.mask is not None:
            return self.choice(node, dst)
        raise _NoSpelling

    def apply(self, template: str, operands: list, dst: str) -> list[str]:
        """``template`` over the operands, a compound one computed into ``dst`` first."""
        texts = [self.leaf(a) for a in operands]
        compound = [i for i, t in enumerate(texts) if t is None]
        if len(compound) > 1:
            raise _NoSpelling
        first = []
        for i in compound:
            first, texts[i] = self.into(operands[i], dst), dst
        return first + [template.format(*texts, dst=dst)]

    def product(self, node, dst: str) -> list[str]:
        factors = _factors(node)
        texts = [self.leaf(f) for f in factors]
        compound = [f for f, t in zip(factors, texts) if t is None]
        plain = [t for t in texts if t is not None]
        if len(compound) > 1:
            raise _NoSpelling
        if compound:
            out = self.into(compound[0], dst)
            return out + [f"multiply({dst}, {t}, out={dst})" for t in reversed(plain)]
        out = [f"multiply({plain[0]}, {plain[1]}, out={dst})"]
        return out + [f"multiply({dst}, {t}, out={dst})" for t in plain[2:]]

    def choice(self, node, dst: str) -> list[str]:
        """``(a if l > r else 0)`` as ``greater(l, r, out=mask); multiply(a, mask, out=dst)``."""
        test, value = node.test, self.leaf(node.body)
        if not (isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.Gt) and value is not None
                and self.leaf(node.orelse) in ("0.0", "0")):
            raise _NoSpelling
        left, right = self.leaf(test.left), self.leaf(test.comparators[0])
        if left is None or right is None:
            raise _NoSpelling
        return [f"greater({left}, {right}, out={self.mask})", f"multiply({value}, {self.mask}, out={dst})"]


def _factors(node) -> list:
    """The factors of a chain of products, in order: ``a * b * c`` -> [a, b, c]."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _factors(node.left) + _factors(node.right)
    return [node]


def spells(formula, calls: dict[str, str]) -> bool:
    """Whether an op's forward formula and every VJP formula have a spelling."""
    names = {n: n for n in ("x0", "x1", "y", "g", "c")}
    return all(spell(f, names, "d", calls, mask="m") is not None for f in (formula.forward, *formula.vjp))
