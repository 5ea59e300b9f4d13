"""A spin barrier for a few threads running one compiled loop together.

When generation splits each step's products across threads (feedsplit.py),
the threads meet several times a step, a few microseconds apart. A lock or
an event costs a system call and a wake-up each time, as long as the work
between meetings; a barrier that spins on a shared counter costs a cache line
passed between cores. Numba has no atomic operations, so the loads, stores
and the fetch-and-add are written here as LLVM atomics (acquire and release:
what one thread wrote before the barrier, the others read after it).

The barrier is a generation count: each thread adds itself to the count of
arrivals; the last to arrive resets the count and advances the generation,
for which the others wait. A waiting thread spins a bounded number of times,
then yields its core at each check: on a machine busier than its threads, the
thread it waits for may be waiting for that very core.

The threads stop together, at one barrier, when more than :data:`YIELDS`
meetings of a run had a thread yield its core: the machine has more runnable
threads than cores, each meeting then waits for a thread the scheduler put
aside, and one thread alone would be faster. (A meeting or two yields anyway,
the first one of a run, while the worker thread wakes up.) The last thread to arrive decides, so every
thread returns False at the same barrier and the caller can finish the run
on one thread from that step.

A run that fails in one thread must not leave the others waiting forever:
:func:`abort` marks the barrier stopped, and every barrier after that returns
False at once, which the generated loop takes as its cue to return.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from unrolled.graph.buffers import aligned_zeros

from .jitcache import prepare_numba_cache

prepare_numba_cache()  # before the first cache=True function

# Slots of the barrier's array, each on a cache line of its own: arrivals change the count while
# waiting threads read the generation.
COUNT, GENERATION, STOPPED, YIELDED = 0, 8, 16, 24
SPINS = 20000  # checks before a waiting thread starts yielding its core: longer than any step's phase
YIELDS = 100  # meetings of one run that yielded, after which the threads stop: the machine is busy


def new_barrier() -> np.ndarray:
    """A barrier for one run: its count, generation, stop flag and count of yields, all zero."""
    return aligned_zeros((4 * 8,), np.int64)


def abort(bar: np.ndarray) -> None:
    """Release every thread waiting at ``bar``, now and at every later barrier (their loops then return)."""
    bar[STOPPED] = 1


def _slot(context, builder, sig, args):
    """A pointer to ``arr[index]``, the intrinsic's first two arguments."""
    index = context.cast(builder, args[1], sig.args[1], types.intp)
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, sig.args[0], ary, [index], wraparound=False)


def _int64_array(arr) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1


@intrinsic
def load_acquire(typingctx, arr, index):
    """``arr[index]``, read after everything the thread that released it wrote before."""
    if not _int64_array(arr):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig, args), "acquire", 8)
    return types.int64(arr, index), codegen


@intrinsic
def store_release(typingctx, arr, index, value):
    """``arr[index] = value``, after everything this thread wrote before it."""
    if not _int64_array(arr):
        return None

    def codegen(context, builder, sig, args):
        value = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(value, _slot(context, builder, sig, args), "release", 8)
        return context.get_dummy_value()
    return types.none(arr, index, value), codegen


@intrinsic
def fetch_add(typingctx, arr, index, value):
    """``arr[index] += value`` as one step no other thread can split; the value before."""
    if not _int64_array(arr):
        return None

    def codegen(context, builder, sig, args):
        value = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", _slot(context, builder, sig, args), value, "acq_rel")
    return types.int64(arr, index, value), codegen


@intrinsic
def sched_yield(typingctx):
    """The C library's ``sched_yield()``: let another thread run on this core."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@numba.njit(cache=True, nogil=True)
def barrier(bar, nparts):
    """Wait until all ``nparts`` threads have called this; False if the threads stop here or the run
    was aborted (then return)."""
    generation = load_acquire(bar, GENERATION)
    if fetch_add(bar, COUNT, 1) == nparts - 1:
        if load_acquire(bar, YIELDED) > YIELDS:
            store_release(bar, STOPPED, 1)
        store_release(bar, COUNT, 0)  # before the new generation: no thread arrives again until it sees that
        store_release(bar, GENERATION, generation + 1)
    else:
        spins = 0
        while load_acquire(bar, GENERATION) == generation:
            spins += 1
            if spins > SPINS:
                if load_acquire(bar, STOPPED) != 0:  # aborted: the last thread may never come
                    return False
                if spins == SPINS + 1:
                    fetch_add(bar, YIELDED, 1)
                sched_yield()
    return load_acquire(bar, STOPPED) == 0
