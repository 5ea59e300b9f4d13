"""Scalar functions for the generated loops: tanh, e^x and the logistic function of one
number, and a constant cast to an operand's precision.

In float32 these are pure arithmetic, so that the loops calling them vectorize (the C
library's tanhf and expf go one number at a time); in float64 they are the C library's,
exactly as NumPy, but for the sampler's draw (``exp_draw``), whose e^z no engine must match.
The array kernels (arrays.py), the row kernels (rows.py) and the fused kernels rendered from
the op table (fuse.py, wholestep.py, feedback.py) all inline them.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .jitcache import prepare_numba_cache

prepare_numba_cache()  # the kernel modules importing these define cache=True functions next


def tanh1(x):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(tanh1, inline="always")
def _tanh1_overload(x):
    """tanh of one number: in float64 the C library's, exactly as NumPy; in float32 pure
    arithmetic, so that the loops vectorize (the C library's tanhf goes one number at a time).

    float32: for |x| < 0.625 Eigen's rational approximation, accurate there to a few ulps;
    beyond, 1 - 2 / (1 + e^(2|x|)) with ``exp1``. Within 1e-7 and 5 ulps of the true tanh
    everywhere (tests/test_jit.py checks it on a dense grid of float32s), exactly +-1
    where the float32 tanh rounds to +-1 (|x| > 9.02) and at +-inf, NaN for NaN. The saturation
    matters: backward rules compute the derivative from this value (1 - y^2), and a value that
    stopped short of 1 would pass gradient through a saturated unit."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def impl(x):
            a = abs(x)
            s = min(a, np.float32(0.625))  # the rational part's argument: only small ones are used
            s2 = s * s
            p = np.float32(-2.76076847742355e-16)
            p = s2 * p + np.float32(2.00018790482477e-13)
            p = s2 * p + np.float32(-8.60467152213735e-11)
            p = s2 * p + np.float32(5.12229709037114e-08)
            p = s2 * p + np.float32(1.48572235717979e-05)
            p = s2 * p + np.float32(6.37261928875436e-04)
            p = s2 * p + np.float32(4.89352455891786e-03)
            q = np.float32(1.19825839466702e-06)
            q = s2 * q + np.float32(1.18534705686654e-04)
            q = s2 * q + np.float32(2.26843463243900e-03)
            q = s2 * q + np.float32(4.89352518554385e-03)
            far = np.float32(1.0) - np.float32(2.0) / (np.float32(1.0) + exp1(np.float32(2.0) * a))
            # choices by arithmetic, not branches (an inlined conditional trips Numba's checks); a NaN
            # x fails both tests and comes out of exp1 as NaN
            near = np.float32(a < np.float32(0.625))
            sign = np.float32(1.0) - np.float32(2.0) * np.float32(x < np.float32(0.0))
            return sign * (near * (s * p / q) + (np.float32(1.0) - near) * far)
        return impl
    return lambda x: math.tanh(x)


@intrinsic
def _f64_from_bits(typingctx, bits):
    """The float64 whose bit pattern is the int64 ``bits`` (a free reinterpretation in LLVM)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a free reinterpretation in LLVM)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


def exp1(x):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(exp1, inline="always")
def _exp1_overload(x):
    """e**x of one number: in float32 Cephes' expf (x = n ln 2 + r, a degree-6 polynomial in r,
    2**n built from its bits; within 1.4 ulp of the true value, checked over [-87, 88]), pure
    arithmetic so the loops vectorize where the C library's expf goes one number at a time; in
    float64 the C library's. Below -87 it returns e**-87 (~1.6e-38), not the
    subnormal or zero, which no softmax can tell apart."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def impl(x):
            x = min(max(x, np.float32(-87.0)), np.float32(88.0))
            n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
            r = x - n * np.float32(0.693359375)
            r = r - n * np.float32(-2.12194440e-4)
            y = np.float32(1.9875691500e-4)
            y = y * r + np.float32(1.3981999507e-3)
            y = y * r + np.float32(8.3334519073e-3)
            y = y * r + np.float32(4.1665795894e-2)
            y = y * r + np.float32(1.6666665459e-1)
            y = y * r + np.float32(5.0000001201e-1)
            y = y * (r * r) + r + np.float32(1.0)
            return y * _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
        return impl
    return lambda x: math.exp(x)


# e^z for z <= 0 in float64 (exp_draw): z = n ln 2 + r with |r| <= ln 2 / 2, ln 2 in two parts
# (Cephes' exp) so that n times the first is exact, and e^r by its Taylor series to r^13, whose
# remainder is below 1e-17; within an ulp of the C library's exp, checked in tests/test_generate.py
EXP_LOG2E = 1.4426950408889634
EXP_LN2_HI = 6.93145751953125e-1
EXP_LN2_LO = 1.42860682030941723212e-6
EXP_LOWEST = -708.0  # below, e^z is subnormal or 0 in float64; the draw takes it as 0
EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))  # 1/13! .. 1/0!


@numba.njit(cache=True, nogil=True, error_model="numpy")
def exp_draw(z):
    """e^z of one float64 ``z <= 0`` (see ``EXP_TAYLOR``); 0 below ``EXP_LOWEST`` and for NaN. The
    sampler's draw (sampling.py) takes it, unlike ``exp1``'s float64 e^x, which is the C library's
    as NumPy's engine is: the draw's loop of them vectorizes, and no engine must match it."""
    if not z >= EXP_LOWEST:
        return 0.0
    n = np.floor(z * EXP_LOG2E + 0.5)
    r = z - n * EXP_LN2_HI
    r = r - n * EXP_LN2_LO
    p = EXP_TAYLOR[0]
    for c in EXP_TAYLOR[1:]:
        p = p * r + c
    return p * _f64_from_bits((np.int64(n) + np.int64(1023)) << np.int64(52))


def sigmoid1(x):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(sigmoid1, inline="always")
def _sigmoid1_overload(x):
    """σ of one number as 1 / (1 + e^-x), staying in x's precision (a float64 constant would
    promote a float32 x to float64 and send it to the C library, one call an element).

    float32: e^-x by ``exp1``, so it vectorizes; within 3 ulps of the true σ wherever σ is a
    normal float32 (tests/test_jit.py checks it), exactly 1 where the float32 σ rounds to 1
    (x > 17.4) and at +inf, 0 below -88 and at -inf, NaN for NaN. Unlike (1 + tanh(x/2)) / 2 it
    keeps its relative precision in the lower tail, where the derivative y (1 - y) is y itself."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def impl(x):
            y = np.float32(1.0) / (np.float32(1.0) + exp1(-x))
            return y - y * np.float32(x < np.float32(-88.0))  # 0 below -88 (and at -inf); NaN stays NaN
        return impl

    def impl64(x):  # as ops.sigmoid: e^-|x| never overflows; below 0, σ = e^x / (1 + e^x)
        e = math.exp(-abs(x))
        below = np.float64(x < 0.0)
        return (below * e + (1.0 - below)) / (1.0 + e)
    return impl64


def cast(c, x):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(cast, inline="always")
def _cast_overload(c, x):
    """The constant ``c`` in the type of ``x``, so that ``x * c`` stays float32 when x is."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda c, x: np.float32(c)
    return lambda c, x: np.float64(c)
