"""Generation on several threads: each step's products shared out by columns, one share a thread.

At a batch of one row, a step's products read every weight once and do two
flops per number read: they run as fast as the weights arrive. Once a model's
weights outgrow what a core's own (L2) cache keeps beside everything else,
they come from the shared cache every step. Shared by columns across two
cores, each core reads only its half, which stays in its own L2: a copy of
its columns made for the run (:func:`columns_name`), streamed as one block.

This module writes that step loop for a :class:`~.feedback.Generator`: one
function, run by every thread with its own ``PART``. Each product computes its
thread's columns; each elementwise loop and concat copy its thread's entries;
the token, its one-hot row and the sampling stay with thread 0. Each entry is
computed by one thread with the one-thread loop's arithmetic (the same
kernels, the same order), so the tokens and states are those of one thread,
bit for bit; the random numbers are still drawn up front by the caller.

Where a thread reads entries another thread wrote (a product reads its whole
input, the sampler all the logits) or writes entries another may still read,
the threads meet at a barrier (kernels/spin.py). :func:`plan` finds those
places from each stretch of code's reads and writes, around the step loop's
cycle.

A thread sums its share of a product in a block of its own (:func:`own_blocks`)
and copies the sums into the shared buffer once. Summed in place, it rewrote
its entries once for every few rows of the weights, beside the entries of
another thread; each core's prefetchers, fetching lines near those it writes,
kept taking the other's lines, and two threads' products ran side by side far
slower than each alone.

Where the next loop reads a product's entries in pieces (an LSTM cell's gate
loop: the same quarter of each of four gate blocks), each thread computes
just the pieces its share of that loop reads, so the loop needs no barrier
after the product: two fewer a step for an LSTM. Its copy of the weights
holds those columns side by side, one block, one product summed in its own
block and copied out piece by piece. (Earlier forms were slower than the
barriers they spared: pieces read from the whole matrix, each core's
prefetchers then filling its cache with the other core's columns; and four
short products a thread from copies of their own.) Elsewhere a product's
columns are shared in contiguous blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from unrolled.graph.buffers import aligned, aligned_zeros
from unrolled.graph.folded import Param, Vertex

from .pinned import PinnedThreads, join
from .plan import is_view

# Below this many bytes of product weights a core's own L2 (half a megabyte or more on current x86
# cores) holds them with room to spare: a second thread would add barriers and no cache.
MIN_WEIGHT_BYTES = 256 << 10
AUTO_THREADS = 2  # two halves of the weights; more shares add a thread to every barrier for weights that fit already
ALIGN = 16  # shares start at multiples of 16 entries: on a cache line of their own in float32
MIN_SHARE = 32  # a loop over fewer entries runs on thread 0 unless sharing it saves a barrier
MIN_SHARED_WEIGHT = 64 << 10  # a product with fewer bytes of weights likewise (one core reads them quickly)

Spans = list[tuple[int, int]]  # entries [lo, hi) of a buffer's rows


def choose(gen, B: int, dtype, threads: int | str = "auto") -> tuple[int, str]:
    """How many threads generate ``B`` rows (at most ``LOOP_ROWS``; more split by rows, feedrows.py)
    of ``dtype`` with ``gen``, and why, in words.

    ``threads``: "auto" splits when the rule below says it pays; a number
    asks for that many threads wherever a split is possible (tests force one
    or two). "auto" takes at most :data:`AUTO_THREADS`, and no more than the
    cores this process may use or ``OMP_NUM_THREADS``."""
    if threads == 1:
        return 1, "threads=1"
    if not gen.use_jit:
        return 1, "the NumPy generator runs on one thread"
    if np.dtype(dtype) not in (np.float32, np.float64):
        return 1, f"{np.dtype(dtype).name}: only float32 and float64 loops split"
    if threads != "auto":
        return int(threads), f"threads={threads} asked for"
    cores, cap = usable_cores(), thread_cap()
    n = min(AUTO_THREADS, cores, cap if cap is not None else cores)
    if n < 2:
        return 1, f"{cores} usable core(s), OMP_NUM_THREADS={cap}: one thread"
    size = weight_bytes(gen, dtype)
    if size <= MIN_WEIGHT_BYTES:
        return 1, f"{size} bytes of product weights fit one core's cache (split above {MIN_WEIGHT_BYTES})"
    return n, f"{size} bytes of product weights shared by columns across {n} threads"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_cap() -> int | None:
    """The user's limit on threads a computation takes (``OMP_NUM_THREADS``, its first level), if any."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:
        return None


def weight_bytes(gen, dtype) -> int:
    """The bytes of weights the step's products read: what each step streams through the cache."""
    shapes = [v.args[0].shape for v in gen.order if v.kind == "op" and v.op in ("matmul", "linear")]
    return sum(int(np.prod(s)) for s in shapes) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------- the plan


@dataclass
class Phase:
    """A stretch of one step's code: each thread's lines, and which entries of which buffers each
    thread reads and writes there (buffer -> [part] -> spans)."""

    comment: list[str]
    lines: list[list[str]]
    reads: dict[str, list[Spans]]
    writes: dict[str, list[Spans]]


def _meet(a: Spans, b: Spans) -> bool:
    return any(lo < e and s < hi for lo, hi in a for s, e in b)


def _crosses(x: list[Spans], y: list[Spans]) -> bool:
    """Do one thread's entries in ``x`` meet another thread's in ``y``?"""
    return any(p != q and _meet(a, b) for p, a in enumerate(x) for q, b in enumerate(y))


def conflict(before: Phase, after: Phase) -> bool:
    """Must ``after`` wait for every thread to finish ``before``? Yes where one thread reads or writes
    what another wrote, or writes what another read."""
    pairs = [(before.writes, after.reads), (before.writes, after.writes), (before.reads, after.writes)]
    return any(_crosses(x[k], y[k]) for x, y in pairs for k in x.keys() & y.keys())


def plan(choices: list[list[Phase]]) -> list[tuple[bool, Phase]]:
    """Each stretch of the step as one of its ways (the first that needs no barrier, else its first),
    and whether a barrier comes before it.

    Within a stretch the threads never meet: it reads its arguments and writes its own vertex,
    which share a buffer only as two slots of a ring (a state and its delay), and a ring counts
    here as one buffer, every slot at once, which may add a barrier but never misses one.
    A barrier goes where a stretch conflicts with one run since the last barrier, the step loop
    read as a cycle: the first stretches of a step follow the last ones of the step before, so
    the walk goes round until a lap adds no barrier."""
    chosen: list[Phase | None] = [None] * len(choices)
    barriers: set[int] = set()
    since: list[Phase] = []  # run since the last barrier
    changed = True
    while changed:
        changed = False
        for i, ways in enumerate(choices):
            if i in barriers:
                since = []
            if chosen[i] is None:
                free = [w for w in ways if not any(conflict(s, w) for s in since)]
                chosen[i] = free[0] if free else ways[0]
            if any(conflict(s, chosen[i]) for s in since):
                barriers.add(i)
                changed, since = True, []
            since.append(chosen[i])
    return [(i in barriers, phase) for i, phase in enumerate(chosen)]


# ------------------------------------------------------------ the stretches


class Stretches:
    """The stretches of one step of ``gen``'s loop for ``nparts`` threads, each with its ways to run."""

    def __init__(self, gen, nparts: int):
        self.gen, self.n = gen, nparts

    def edges(self, size: int) -> list[int]:
        cuts = [min(size, round(size * k / self.n / ALIGN) * ALIGN) for k in range(self.n)]
        return cuts + [size]

    def shares(self, size: int) -> list[Spans]:
        e = self.edges(size)
        return [[(e[p], e[p + 1])] for p in range(self.n)]

    def alone(self, size: int) -> list[Spans]:
        """All ``size`` entries with thread 0, none with the others."""
        return [[(0, size)]] + [[] for _ in range(self.n - 1)]

    def where(self, v) -> tuple[str, int, int] | None:
        """The buffer holding ``v``, and where ``v``'s entries are in its rows (None: a parameter)."""
        gen = self.gen
        if isinstance(v, Param):
            return None
        if is_view(v, gen.depth):
            buf, lo, _ = self.where(v.args[0])
            return buf, lo + v.attrs["start"], lo + v.attrs["stop"]
        if v is gen.feed:
            return "TOK", 0, 1
        name = v.source.name if v.kind == "delay" else v.name
        prefix = "R_" if name in gen.depth else "S_"
        return prefix + gen.names[name], 0, v.size

    def access(self, pairs) -> dict[str, list[Spans]]:
        """``(vertex, [part] -> spans of the vertex's entries)`` pairs as spans of their buffers."""
        out: dict[str, list[Spans]] = {}
        for v, spans in pairs:
            at = self.where(v)
            if at is None:
                continue
            buf, lo, hi = at
            if buf == "TOK":  # one token a row, whichever entries
                spans = [[(0, 1)] if s else [] for s in spans]
            have = out.setdefault(buf, [[] for _ in range(self.n)])
            for p, s in enumerate(spans):
                have[p].extend((lo + a, lo + b) for a, b in s)
        return out

    def serial(self, comment, lines, reads, writes) -> Phase:
        """A stretch that thread 0 runs alone, reading and writing the whole of each vertex."""
        return Phase(comment, [lines] + [[] for _ in range(self.n - 1)],
                     self.access((v, self.alone(v.size)) for v in reads),
                     self.access((v, self.alone(v.size)) for v in writes))

    def all(self, itemsize: int) -> list[list[Phase]]:
        """Every stretch of the step, in order, each with its ways to run (see :meth:`_ways`);
        ``itemsize``: the bytes of one number, which decide whether a product's weights are worth sharing."""
        gen = self.gen
        out = [[Phase([], [gen._feed_lines()] + [[] for _ in range(self.n - 1)], {}, {"TOK": self.alone(1)})]]
        groups = gen._groups()
        for i, group in enumerate(groups):
            v = group[0]
            comment = [f"# {u.name} = {u.op}({', '.join(a.name for a in u.args)})" for u in group]
            if gen._fusable(v):
                out.append(self._ways(v.size, lambda span, group=group: gen._emit_elementwise(group, span)[len(group):],
                                      lambda spans, group=group: self._elementwise_access(group, spans), comment))
            elif v.op in ("matmul", "linear"):
                ways = [self._product(v, self.shares(v.size), comment), self._product(v, self.alone(v.size), comment)]
                if np.prod(v.args[0].shape) * itemsize < MIN_SHARED_WEIGHT:
                    ways.reverse()
                else:
                    read = self._as_read(v, groups[i + 1] if i + 1 < len(groups) else [])
                    ways[:0] = [self._product(v, read, comment)] if read else []
                out.append(ways)
            elif v.op == "concat":
                for x, off in gen._concat_offsets(v):
                    out.append(self._ways(x.size, lambda span, v=v, x=x, off=off: gen._copy_loop(v, x, off, span),
                                          lambda spans, v=v, x=x, off=off: self._copy_access(v, x, off, spans),
                                          comment))
                    comment = []
            else:
                args = [a for a in v.args if isinstance(a, Vertex)]
                out.append([self.serial(comment, gen._emit_loops(v), args, [v])])
        out.append([self.serial([], gen._sample_lines(), [gen.logits], [])])
        out[-1][0].writes.update({k: self.alone(1) for k in ("TOK", "PROBS", "OUT")})
        return out

    def _ways(self, size, lines, access, comment) -> list[Phase]:
        """A loop over ``size`` entries two ways: shared out, or on thread 0 alone; the first preferred."""
        def way(spans):
            reads, writes = access(spans)
            return Phase(comment, [[ln for a, b in s for ln in lines((a, b))] for s in spans], reads, writes)
        shared, alone = way(self.shares(size)), way(self.alone(size))
        return [shared, alone] if size >= MIN_SHARE else [alone, shared]

    def _elementwise_access(self, group, spans):
        members = {v.name for v in group}
        gen = self.gen
        reads = [(a, spans) for v in group for a in v.args if isinstance(a, Vertex) and a.name not in members]
        writes = [(v, spans) for v in group
                  if v.name in gen.depth or v is gen.logits or not gen._users[v.name] <= members]
        return self.access(reads), self.access(writes)

    def _copy_access(self, v, x, off, spans):
        return self.access([(x, spans)]), self.access([(v, [[(off + a, off + b) for a, b in s] for s in spans])])

    def _as_read(self, v: Vertex, group: list[Vertex]) -> list[Spans] | None:
        """The entries of product ``v`` each thread's share of the elementwise loop ``group`` reads
        (an LSTM cell's gate loop: the same quarter of each gate block), when every thread reads
        some, all in pieces of one length: computed so, the product needs no barrier before that
        loop. None where ``group`` is no such loop."""
        if not group or not self.gen._fusable(group[0]) or group[0].size < MIN_SHARE:
            return None
        reads, _ = self._elementwise_access(group, self.shares(group[0].size))
        at = self.where(v)
        spans = reads.get(at[0]) if at else None
        if not spans or not all(spans) or spans == self.shares(v.size):
            return None
        spans = [sorted(set(s)) for s in spans]
        edges = [edge for lo, hi in sorted(span for s in spans for span in s) for edge in (lo, hi)]
        tiles = edges[0] == 0 and edges[-1] == v.size and all(a == b for a, b in zip(edges[1:-1:2], edges[2::2]))
        one_length = len({hi - lo for s in spans for lo, hi in s}) == 1 and len({len(s) for s in spans}) == 1
        return spans if tiles and one_length else None

    def _product(self, v: Vertex, spans: list[Spans], comment) -> Phase:
        """Product ``v``, each thread computing its columns (``spans``) from the whole input: shared
        out, from its own copy of those columns (:func:`columns_name`), summed in a block of its own
        (``OWN``); alone, from the weights."""
        gen = self.gen
        dst, x, W = gen._val(v), gen._val(v.args[1]), f"W_{gen.names[v.name]}"
        shared = sum(bool(s) for s in spans) > 1
        bias = f", {gen._val(v.args[2])}" if v.op == "linear" else ""

        def calls(s: Spans) -> list[str]:
            if not s:
                return []
            if not shared:
                return [f"{v.op}_columns({x}, {W}{bias}, {dst}, {lo}, {hi}, {lo})" for lo, hi in s]
            starts = "(" + ", ".join(str(lo) for lo, _ in s) + ",)"
            return [f"{v.op}_pieces_own({x}, {columns_name(W, s)}{bias}, {dst}, {starts}, {s[0][1] - s[0][0]}, "
                    "OWN[PART])"]

        reads = [(v.args[1], [[(0, v.args[1].size)]] * self.n)]
        if v.op == "linear":
            reads.append((v.args[2], spans))
        return Phase(comment, [calls(s) for s in spans], self.access(reads), self.access([(v, spans)]))


COLUMNS_SUFFIX = r"(?:_cols\d+_\d+)+"  # what columns_name adds to the weights' name, as a regular expression


def columns_name(weights: str, spans: Spans) -> str:
    """The name generated code gives a thread's own copy of the columns ``spans`` of ``weights``.

    A thread's share of a product's weights, as columns of the whole matrix, is
    a short piece of every row, the rest of each row another core's; the cache
    then streams it as many short runs, at well below the rate it streams one
    contiguous block. Its own copy, made once a run (:func:`bind_columns`), is
    that one block, and lies in its core's cache alone. Several spans: their columns side by side."""
    return weights + "".join(f"_cols{lo}_{hi}" for lo, hi in spans)


def bind_columns(bind: dict, names: list[str]) -> None:
    """Add to ``bind`` each thread's copy of its columns that ``names`` (:func:`columns_name`) asks for."""
    for name in names:
        weights, *spans = name.split("_cols")
        if spans:
            cuts = [tuple(int(c) for c in span.split("_")) for span in spans]
            bind[name] = aligned(np.concatenate([bind[weights][:, lo:hi] for lo, hi in cuts], axis=1))


# ---------------------------------------------------------------- the code


def write(gen, nparts: int, dtype) -> str:
    """The source of ``generate_part(PART, BAR, OWN, N, ...)``: one step loop that ``nparts`` threads
    run together, thread ``PART`` doing its share, all meeting at the barrier ``BAR``, summing its
    products in ``OWN[PART]`` (:func:`own_blocks`). It returns ``N``,
    or the step at whose barrier the threads stopped (kernels/spin.py): that step is not done, and
    running it again from its start gives what it would have (it reads only the slots of earlier
    steps, and the sampling, its last stretch, comes after every barrier)."""
    body = []
    for barrier_before, phase in plan(Stretches(gen, nparts).all(np.dtype(dtype).itemsize)):
        if barrier_before:
            body += [f"if not barrier(BAR, {nparts}):", "    return t  # stopped: the machine is busy, or a thread failed"]
        body += phase.comment
        first = True
        for p, lines in enumerate(phase.lines):
            if lines:
                body += [f"{'if' if first else 'elif'} PART == {p}:"] + ["    " + ln for ln in lines]
                first = False
    return "\n".join(["def generate_part(PART, BAR, OWN, N, n_prime, PRIME, U, TEMP, TOPK, OUT, PROBS, TOK{args}):",
                      "    B = TOK.shape[0]",
                      "    for t in range(N):"] + ["        " + ln for ln in body] + ["    return N"]) + "\n"


def own_blocks(gen, nparts: int, B: int, dtype) -> np.ndarray:
    """``[nparts, n]``: a block for each thread to sum its share of a product in, room for ``B`` rows
    of the widest product, with a page between one thread's block and the next: a core's
    prefetchers fetch lines near those it writes, and a page away they fetch none of them."""
    widest = max((v.size for v in gen.order if v.kind == "op" and v.op in ("matmul", "linear")), default=1)
    itemsize = np.dtype(dtype).itemsize
    stride = -(-B * widest * itemsize // PAGE) * PAGE + PAGE
    return aligned_zeros((nparts, stride // itemsize), dtype)


PAGE = 4096


# ---------------------------------------------------------------- the threads


def run(fn, nparts: int, args: list):
    """``fn(part, barrier, *args)`` for each part, part 0 on the calling thread, each other part on a
    worker thread of its own; what part 0 returned. If one part fails, the barrier is aborted so the
    others return, and the failure is raised once every part is done."""
    from .kernels import spin

    bar = spin.new_barrier()
    futures, finished = [], False
    try:
        futures = [w.submit(_part, fn, bar, p, args) for p, w in enumerate(_workers(nparts - 1), start=1)]
        result = fn(0, bar, *args)
        finished = True
    finally:
        if not finished:
            spin.abort(bar)
        join(futures)
    for f in futures:
        f.result()
    return result


def _part(fn, bar, part: int, args: list) -> None:
    from .kernels import spin

    try:
        fn(part, bar, *args)
    except BaseException:
        spin.abort(bar)
        raise


_workers = PinnedThreads("unrolled-generate").first
