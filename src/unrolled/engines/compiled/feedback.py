"""Generation with feedback: run a graph one step at a time, sampling each step's
output and feeding it back as the next step's input (a character model writing
text, a one-to-many decoder spelling a word).

A training engine is the wrong tool here: it is built for ``T`` steps at
once, and one step of it pays that bookkeeping every time. A
:class:`Generator` instead emits the forward pass of *one* step as straight
code over preallocated ``[B, F]`` buffers, with each delayed vertex kept in a
small ring of its last ``D + 1`` values, and wraps the sampling loop around
it. With Numba installed the whole loop (steps and sampling) is compiled,
each run of elementwise ops of one size written as one loop over its entries
(an LSTM cell's gates and state update: one pass, nothing stored that only
the loop reads) and each product of a few rows as a plain loop; without Numba
every op is one NumPy call. Either way the random numbers
come from the caller's NumPy generator, drawn up front, so a seed gives the
same text. Where a model's weights outgrow one core's cache, the Numba loop
runs on two threads, each computing its share of every step's entries
(feedsplit.py); the text and states are the same, bit for bit. Above
``LOOP_ROWS`` rows, each thread samples rows of its own instead (feedrows.py).
"""

from __future__ import annotations

import linecache

import numpy as np

from unrolled.engines.compiled.kernels.blas import aligned, aligned_zeros, product
from unrolled.engines.compiled.kernels.jitcache import numba_allowed
from unrolled.engines.runio import as_history
from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.ops import ELEMENTWISE, OPS

from . import feedrows, feedsplit, rowsplit
from .fuse import operand_names, scalar_code
from .plan import is_view
from .ufunc_calls import spell

# How the step's NumPy calls spell the calls of op formulas (ufunc_calls.py); under Numba the
# array kernels of the same names stand in.
_CALLS = {"tanh": "tanh({0}, out={dst})", "exp": "exp({0}, out={dst})", "max": "maximum({0}, {1}, out={dst})",
          "sigmoid": "sigmoid({0}, out={dst})"}


class Generator:
    """Samples ``feed`` from ``logits`` step after step; see the module docstring.

    ``graph``: the model; ``feed``: the index input that receives each sampled
    token; ``logits``: the vertex whose softmax is sampled. Other inputs are
    not allowed (a generator has nothing to feed them). ``threads``: "auto"
    shares each step's products across two threads where the weights outgrow
    one core's cache (feedsplit.py says when), and a batch of more than
    ``LOOP_ROWS`` rows across the cores by rows (feedrows.py); a number asks
    for that many wherever the Numba loop can share its work; 1 never shares.
    """

    def __init__(self, graph: Graph, feed: str, logits: str, *, jit: bool | str = "auto",
                 threads: int | str = "auto"):
        if threads != "auto" and not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"threads={threads!r}: give \"auto\" or a whole number of threads, 1 or more")
        graph.check()
        self.graph = graph
        if feed not in graph.vertices or graph.vertices[feed].kind != "index":
            raise ValueError(f"'{feed}' is not an index input of graph '{graph.name}'")
        if logits not in graph.vertices:
            raise ValueError(f"no vertex named '{logits}' in graph '{graph.name}'")
        self.feed, self.logits = graph.vertices[feed], graph.vertices[logits]
        if self.logits.size != self.feed.size:
            raise ValueError(f"'{logits}' has {self.logits.size} classes but '{feed}' takes {self.feed.size}")
        self.order = _needed(graph, self.logits)
        others = [v.name for v in self.order if v.kind in ("input", "index") and v is not self.feed]
        if others:
            raise ValueError(f"cannot generate: input(s) {', '.join(others)} would have nothing to read")
        self.depth = {name: D for name, D in graph.delayed().items() if name in {v.name for v in self.order}}
        self.names = {v.name: f"v{i}" for i, v in enumerate(self.order)}
        self.pnames = {name: f"p{i}" for i, name in enumerate(graph.params)}
        self.use_jit = _jit_wanted(jit, self.order)
        self.code = self._write()
        self._fn = self._compile()
        self.threads = threads
        self.split_code: dict[tuple[int, str], str] = {}  # the loop shared by threads, by (count, dtype)
        self._split_fns: dict[tuple[int, str], tuple] = {}
        self._alone_ready: set[str] = set()  # the dtypes the one-thread loop is compiled for (any rows)
        self.ran_on: int | None = None  # threads the last run took
        self.alone_from: int | None = None  # the step from which it went on alone, if its threads stopped

    # ------------------------------------------------------------ code

    def _val(self, v, t="t") -> str:
        if isinstance(v, Param):
            return f"P_{self.pnames[v.name]}"
        if v.kind == "delay":
            D = self.depth[v.source.name]
            return f"R_{self.names[v.source.name]}[({t} - {v.depth}) % {D + 1}]"
        if is_view(v, self.depth):
            return f"{self._val(v.args[0], t)}[:, {v.attrs['start']}:{v.attrs['stop']}]"
        if v.name in self.depth:
            return f"R_{self.names[v.name]}[{t} % {self.depth[v.name] + 1}]"
        if v is self.feed:
            return "TOK"
        return f"S_{self.names[v.name]}"

    def _write(self) -> str:
        lines = ["def generate(T0, N, n_prime, PRIME, U, TEMP, TOPK, OUT, PROBS, TOK" + "{args}):",
                 "    B = TOK.shape[0]",
                 "    for t in range(T0, N):"] + ["        " + line for line in self._feed_lines()]
        body = []
        for group in self._groups():
            if self._fusable(group[0]):
                body.extend(self._emit_elementwise(group))
                continue
            v = group[0]
            body.append(f"# {v.name} = {v.op}({', '.join(a.name for a in v.args)})")
            body.extend(self._emit_loops(v) if self.use_jit else self._emit(v))
        lines += ["        " + line for line in body + self._sample_lines()]
        text = "\n".join(lines) + "\n"
        args = self.arg_names = _buffer_args(text)
        return text.replace("{args}", "".join(", " + a for a in args))

    @staticmethod
    def _feed_lines() -> list[str]:
        """Step ``t``'s token: the prime's while it lasts (after it, the one sampled last step)."""
        return ["if t < n_prime:",
                "    for b in range(B):",
                "        TOK[b] = PRIME[t, b]"]

    def _sample_lines(self) -> list[str]:
        """The next step's token, drawn from this step's logits once the prime is read."""
        return ["if t >= n_prime - 1 and t < N - 1:",
                f"    sample_rows({self._val(self.logits)}, TEMP, TOPK, U[t], PROBS, TOK)",
                "    if t + 1 >= n_prime:",
                "        for b in range(B):",
                "            OUT[t + 1 - n_prime, b] = TOK[b]"]

    # ------------------------------------------- code, Numba path only

    def _groups(self) -> list[list[Vertex]]:
        """The step's ops in order, runs of elementwise ops of one size gathered into one group.

        On the Numba path a group becomes one loop over its ``[B, F]``
        entries (an LSTM cell's gates and state update: one loop, not nine
        calls that each pass over memory); on the NumPy path every op stays
        a call of its own.
        """
        groups: list[list[Vertex]] = []
        for v in self.order:
            if v.kind != "op" or is_view(v, self.depth):
                continue
            if self._fusable(v) and groups and self._fusable(groups[-1][-1]) and groups[-1][-1].size == v.size:
                groups[-1].append(v)
            else:
                groups.append([v])
        return groups

    def _fusable(self, v: Vertex) -> bool:
        return self.use_jit and v.op in ELEMENTWISE and all(
            isinstance(a, Vertex) or tuple(a.shape) == (v.size,) for a in v.args)

    def _emit_elementwise(self, group: list[Vertex], span: tuple[int, int] | None = None) -> list[str]:
        """One loop over the group's entries (or those in ``span``, one thread's share); a value is
        stored only where something outside reads it."""
        members = {v.name for v in group}
        local: dict[str, str] = {}
        rows: dict[str, str] = {}
        body = []
        for v in group:
            args = [self._elem(a, "j", rows, local) for a in v.args]
            name = local[v.name] = f"e_{self.names[v.name]}"
            # constants are cast to the arguments' type, so that float32 stays float32 (and vectorizes)
            code = scalar_code(v, OPS[v.op].formula.forward, operand_names(args), lambda c: f"cast({c}, {args[0]})")
            body.append(f"{name} = {code}")
            if v.name in self.depth or v is self.logits or not self._users[v.name] <= members:
                body.append(f"{self._elem(v, 'j', rows)} = {name}")
        return ([f"# {v.name} = {v.op}({', '.join(a.name for a in v.args)})" for v in group]
                + self._row_loops(group[0].size, rows, body, span))

    def _emit_loops(self, v: Vertex) -> list[str]:
        """The Numba path's line(s) for an op outside the elementwise groups."""
        rule = LOOP_RULES.get(v.op)
        return rule(self, v) if rule is not None else self._emit(v)

    def _loops_product(self, v: Vertex) -> list[str]:
        dst, a = self._val(v), [self._val(x) for x in v.args]
        n = self.names[v.name]
        # a few rows: the kernels' loops; more: the training loops' products (oneDNN when it runs
        # them, whose pool OpenBLAS's must not wake: see onednn.py)
        few = (f"matmul_rows({a[1]}, W_{n}, {dst})" if v.op == "matmul"
               else f"linear_rows({a[1]}, W_{n}, {a[2]}, {dst})")
        many = ["    " + ln for ln in self._many_rows_product(v, dst, a[1], f"W_{n}")]
        many += [f"    add({dst}, {a[2]}, {dst})"] if v.op == "linear" else []
        return [f"if {a[1]}.shape[0] <= LOOP_ROWS:", f"    {few}", "else:"] + many

    def _many_rows_product(self, v: Vertex, dst: str, x: str, W: str) -> list[str]:
        """``dst = x · W`` for more than ``LOOP_ROWS`` rows, on BLAS. Where ``x`` concatenates the
        fed token's one-hot vector with dense parts, the dense parts are BLAS's and the one-hot part
        adds the one row of ``W`` each token picks: its zeros cost nothing (the row loops skip them
        too), where BLAS would multiply them all."""
        parts = self._concat_offsets(v.args[1]) if v.args[1].op == "concat" else []

        def picks(u: Vertex) -> bool:
            return u.op == "one_hot" and u.args[0] is self.feed

        picked = [(u, off) for u, off in parts if picks(u)]
        dense = [(u, off) for u, off in parts if not picks(u)]
        if not picked or not dense:
            return [f"matmul({x}, {W}, {dst})"]
        lines = [f"{'matmul_add' if i else 'matmul'}({x}[:, {off}:{off + u.size}], {W}[{off}:{off + u.size}], {dst})"
                 for i, (u, off) in enumerate(dense)]
        for _, off in picked:
            lines += [f"for b in range({dst}.shape[0]):",
                      f"    picked = {W}[{off} + TOK[b]]",
                      f"    for j in range({dst}.shape[1]):",
                      f"        {dst}[b, j] += picked[j]"]
        return lines

    def _loops_concat(self, v: Vertex) -> list[str]:
        return [line for x, off in self._concat_offsets(v) for line in self._copy_loop(v, x, off)]

    @staticmethod
    def _concat_offsets(v: Vertex) -> list[tuple[Vertex, int]]:
        """Each argument of concat ``v`` with the entry of ``v`` where its copy starts."""
        out, off = [], 0
        for x in v.args:
            out.append((x, off))
            off += x.size
        return out

    def _copy_loop(self, v: Vertex, x: Vertex, off: int, span: tuple[int, int] | None = None) -> list[str]:
        """Concat ``v``'s copy of its argument ``x`` to its entries from ``off`` on (or of ``x``'s entries in ``span``)."""
        rows: dict[str, str] = {}
        line = f"{self._elem(v, f'{off} + j' if off else 'j', rows)} = {self._elem(x, 'j', rows)}"
        return self._row_loops(x.size, rows, [line], span)

    @staticmethod
    def _row_loops(size: int, rows: dict[str, str], body: list[str], span: tuple[int, int] | None = None) -> list[str]:
        """``for b: for j in range(size): body``, each array row the body reads or writes named
        once per ``b``: the loop then indexes plain vectors (and in float64, where the C library's
        tanh is a call, the row's address is not recomputed after every call). With ``span``,
        only its entries ``j``: one thread's share of the loop (feedsplit.py)."""
        entries = f"range({size})" if span is None else f"range({span[0]}, {span[1]})"
        return (["for b in range(B):"] + [f"    {name} = {expr}" for expr, name in rows.items()]
                + [f"    for j in {entries}:"] + ["        " + line for line in body])

    def _elem(self, v, j: str, rows: dict[str, str], local: dict[str, str] | None = None) -> str:
        """The expression for entry ``[b, j]`` of ``v`` at step ``t``: a loop's local if it has one,
        else an entry of a row named in ``rows`` (row expression -> name)."""
        if isinstance(v, Param):
            return f"P_{self.pnames[v.name]}[{j}]"
        if local and v.name in local:
            return local[v.name]
        if is_view(v, self.depth):
            start = v.attrs["start"]
            return self._elem(v.args[0], f"{start} + {j}" if start else j, rows, local)
        if v.kind == "delay":
            D, n = self.depth[v.source.name], self.names[v.source.name]
            expr, name = f"R_{n}[(t - {v.depth}) % {D + 1}, b]", f"r_{n}_{v.depth}"
        elif v.name in self.depth:
            n = self.names[v.name]
            expr, name = f"R_{n}[t % {self.depth[v.name] + 1}, b]", f"r_{n}"
        else:
            n = self.names[v.name]
            expr, name = f"S_{n}[b]", f"s_{n}"
        return f"{rows.setdefault(expr, name)}[{j}]"

    @property
    def _users(self) -> dict[str, set[str]]:
        """Each vertex's readers in one step: ops through their arguments, delays through their source."""
        if not hasattr(self, "_users_cache"):
            users: dict[str, set[str]] = {v.name: set() for v in self.order}
            for v in self.graph.vertices.values():
                sources = [v.source] if v.kind == "delay" else v.args if v.kind == "op" else []
                for a in sources:
                    if isinstance(a, Vertex) and a.name in users:
                        users[a.name].add(v.name)
            self._users_cache = users
        return self._users_cache

    # ------------------------------------------- code, both paths

    def _emit(self, v: Vertex) -> list[str]:
        """The NumPy call(s) for op ``v``: its rule, spelled from its formula, or the op table's."""
        rule, dst, a = NUMPY_RULES.get(v.op), self._val(v), [self._val(x) for x in v.args]
        if rule is not None:
            return rule(self, v, dst, a)
        if v.op in ELEMENTWISE:
            names = {**{f"x{i}": e for i, e in enumerate(a)}, "c": repr(v.attrs.get("c"))}
            lines = spell(OPS[v.op].formula.forward, names, dst, _CALLS)
            if lines is not None:
                return ["; ".join(lines)]
        return [f"{dst}[...] = FWD_{self.names[v.name]}([{', '.join(a)}])"]

    def _numpy_product(self, v: Vertex, dst: str, a: list[str]) -> list[str]:
        out = [f"matmul({a[1]}, W_{self.names[v.name]}, out={dst})"]
        if v.op == "linear":
            out.append(f"add({dst}, {a[2]}, out={dst})")
        return out

    def _numpy_slice(self, v: Vertex, dst: str, a: list[str]) -> list[str]:
        """Delayed, so not a view: its ring gets a copy of its columns."""
        return [f"copyto({dst}, {a[0]}[:, {v.attrs['start']}:{v.attrs['stop']}])"]

    def _numpy_concat(self, v: Vertex, dst: str, a: list[str]) -> list[str]:
        out, off = [], 0
        for x, src in zip(v.args, a):
            out.append(f"copyto({dst}[:, {off}:{off + x.size}], {src})")
            off += x.size
        return out

    def _compile(self):
        if self.use_jit:
            return _load_jit(self.code, "generate")
        from .kernels import sampling as k

        ns = {"matmul": product, "add": np.add, "subtract": np.subtract, "multiply": np.multiply,
              "negative": np.negative, "exp": np.exp, "tanh": np.tanh, "maximum": np.maximum,
              "copyto": np.copyto, "sigmoid": k.sigmoid_numpy,
              "one_hot": k.one_hot_numpy, "gather_rows": k.gather_rows_numpy, "sample_rows": k.sample_rows_numpy}
        for v in self.order:  # the ops whose NumPy rule the code calls (FWD_)
            if v.kind == "op" and f"FWD_{self.names[v.name]}(" in self.code:
                spec, attrs = OPS[v.op], dict(v.attrs)
                ns[f"FWD_{self.names[v.name]}"] = lambda args, spec=spec, attrs=attrs: spec.forward(args, attrs)
        filename = f"<unrolled generate {self.graph.name} {id(self):x}>"
        linecache.cache[filename] = (len(self.code), None, self.code.splitlines(True), filename)
        exec(compile(self.code, filename, "exec"), ns)
        return ns["generate"]

    # ------------------------------------------------------------- run

    def run(self, params: dict[str, np.ndarray], *, length: int, prime: np.ndarray,
            rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None,
            init_states: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Feed ``prime`` (``[P, B]`` tokens, P >= 1), then sample ``length`` tokens.

        Returns the sampled tokens ``[length, B]`` and each state after the
        last token was read, ready to continue from.
        """
        if temperature <= 0:
            raise ValueError(f"temperature {temperature} must be positive; low values (0.5) are safer, "
                             f"high ones (1.5) more surprising")
        if top_k is not None and not 1 <= top_k <= self.logits.size:
            raise ValueError(f"top-k {top_k} must be between 1 and the {self.logits.size} classes")
        prime = np.asarray(prime, dtype=np.int64)
        if prime.ndim != 2 or prime.shape[0] < 1:
            raise ValueError("prime must be [P, B] tokens with P >= 1")
        P, B = prime.shape
        if prime.min() < 0 or prime.max() >= self.feed.size:
            raise ValueError(f"prime holds a token outside 0..{self.feed.size - 1}")
        dtype = _dtype(params)
        N = P + length
        U = rng.random((max(N, 1), B))
        # the loop reads the token of step t before step t; it runs P + length - 1 steps of the model
        steps = P + length if length > 0 else P
        weights = self._weights(params, dtype)
        # checked against the whole batch here, as [D, B, F], before a part takes its rows of them
        given = {k: as_history(self.graph, k, v, B, dtype, "init_states") for k, v in (init_states or {}).items()}
        threads, _ = self.threads_for(B, dtype)
        self.ran_on, self.alone_from = threads, None
        split_rows = threads > 1 and _rows_loop(B)

        def rows(lo: int, hi: int):
            """Rows ``lo:hi`` sampled, on the calling thread or (``threads`` > 1) on a share of each step."""
            bind = {**weights, **self._states(params, hi - lo, dtype, {k: v[:, lo:hi] for k, v in given.items()})}
            out = np.zeros((max(length, 0), hi - lo), dtype=np.int64)
            head = [steps, P, np.ascontiguousarray(prime[:, lo:hi]), np.ascontiguousarray(U[:, lo:hi]),
                    float(temperature), int(top_k or 0), out, np.empty((hi - lo, self.logits.size), np.float64),
                    np.zeros(hi - lo, dtype=np.int64)]
            with np.errstate(under="ignore", over="ignore"):
                done = 0
                if threads > 1 and not split_rows:
                    self._ready_alone(head, bind, dtype)
                    fn, names = self._split(threads, dtype)
                    feedsplit.bind_columns(bind, names)
                    own = feedsplit.own_blocks(self, threads, hi - lo, dtype)
                    done = feedsplit.run(fn, threads, [own] + head + [bind[n] for n in names])
                    if done < steps:  # the threads stopped: too busy a machine (kernels/spin.py)
                        self.alone_from = done
                if done < steps:
                    self._fn(done, *head, *[bind[n] for n in self.arg_names])
            return out, self._finals(bind, steps)

        if not split_rows:
            return rows(0, B)
        parts = feedrows.run(rows, rowsplit.even(B, threads))
        out = np.concatenate([o for o, _ in parts], axis=1)
        return out, {k: np.concatenate([f[k] for _, f in parts], axis=-2) for k in parts[0][1]}

    def _ready_alone(self, head: list, bind: dict, dtype) -> None:
        """Compile (or load) the one-thread loop before a shared run needs it to finish alone.

        Shared threads stop when the machine is too busy for them (kernels/spin.py), at any step
        of any run, and the caller finishes on the one-thread loop. Compiled only then, its first
        use would stall that run for as long as Numba takes (seconds, with an empty cache): the
        fallback for a busy moment must be ready before the moment. Called with its first step at
        its last (``T0 = N``), the loop is compiled for these arguments and runs no step."""
        key = np.dtype(dtype).name  # Numba compiles for the arguments' types, not their sizes
        if self.use_jit and key not in self._alone_ready:
            self._fn(head[0], *head, *[bind[n] for n in self.arg_names])
            self._alone_ready.add(key)

    def _finals(self, bind: dict, steps: int) -> dict[str, np.ndarray]:
        """Each state after the last step, read from its ring (``[B, F]``, or ``[D, B, F]`` with D > 1)."""
        finals = {}
        for name, D in self.depth.items():
            ring = bind[f"R_{self.names[name]}"]
            last = steps - 1
            hist = np.stack([ring[(last - k) % (D + 1)] for k in range(D - 1, -1, -1)])
            finals[name] = hist[0] if D == 1 else hist
        return finals

    def threads_for(self, B: int, dtype) -> tuple[int, str]:
        """How many threads a run of ``B`` rows in ``dtype`` takes, and why, in words: above
        ``LOOP_ROWS`` rows each thread samples rows of its own (feedrows.py), else each computes
        its share of every step (feedsplit.py)."""
        if self.use_jit and _rows_loop(B):
            return feedrows.choose(self, B, self.threads)
        return feedsplit.choose(self, B, dtype, self.threads)

    def _split(self, nparts: int, dtype):
        """The step loop shared by ``nparts`` threads (feedsplit.py), compiled, and its buffers' names."""
        key = (nparts, np.dtype(dtype).name)
        if key not in self._split_fns:
            code = feedsplit.write(self, nparts, dtype)
            names = _buffer_args(code)
            self.split_code[key] = code = code.replace("{args}", "".join(", " + a for a in names))
            self._split_fns[key] = _load_jit(code, "generate_part", spin=True), names
        return self._split_fns[key]

    def _weights(self, params, dtype) -> dict:
        """The parameters as the loop reads them, shared by every part of a run's rows."""
        bind = {}
        for name, key in self.pnames.items():
            bind[f"P_{key}"] = aligned(np.asarray(params[name]), dtype)
        for v in self.order:
            if v.kind == "op" and v.op in ("matmul", "linear"):
                # on a cache line: the step's products read it from L2 every character
                bind[f"W_{self.names[v.name]}"] = aligned(np.asarray(params[v.args[0].name]).T, dtype)
        return bind

    def _states(self, params, B, dtype, init_states) -> dict:
        """The values of one step of ``B`` rows, and each delayed vertex's ring, from its initial states."""
        bind = {}
        for v in self.order:
            n = self.names[v.name]
            if v.kind != "op" or is_view(v, self.depth):
                continue
            if v.name in self.depth:
                D = self.depth[v.name]
                ring = aligned_zeros((D + 1, B, v.size), dtype)
                init = self._initial(v, D, B, dtype, params, init_states)
                for k in range(1, D + 1):  # slot of step -k
                    ring[(-k) % (D + 1)] = init[D - k]
                bind[f"R_{n}"] = ring
            else:
                bind[f"S_{n}"] = aligned_zeros((B, v.size), dtype)
        return bind

    def _initial(self, v: Vertex, D: int, B: int, dtype, params, given) -> np.ndarray:
        if v.name in given:
            return as_history(self.graph, v.name, given[v.name], B, dtype, "init_states")
        if v.init == "learned":
            return np.broadcast_to(params[self.graph.init_param_name(v.name)], (D, B, v.size)).astype(dtype)
        if v.init == "given":
            raise ValueError(f"state '{v.name}' has init=given: pass init_states={{'{v.name}': ...}}")
        return np.zeros((D, B, v.size), dtype=dtype)


# The structural ops the sampler writes, each by its rule above, looked up by op name: as NumPy
# calls (NUMPY_RULES; under Numba the array kernels stand in), and, on the Numba path, as loops
# where those are faster (LOOP_RULES). Every elementwise op runs too, from its formula. Any other
# op calls the op table's NumPy rule, which Numba cannot: it keeps the generator on NumPy.
NUMPY_RULES = {"matmul": Generator._numpy_product, "linear": Generator._numpy_product,
               "slice": Generator._numpy_slice, "concat": Generator._numpy_concat,
               "one_hot": lambda self, v, dst, a: [f"one_hot({a[0]}, {dst})"],
               "embedding": lambda self, v, dst, a: [f"gather_rows({a[0]}, {a[1]}, {dst})"]}
LOOP_RULES = {"matmul": Generator._loops_product, "linear": Generator._loops_product,
              "concat": Generator._loops_concat}
JIT_OPS = ELEMENTWISE | frozenset(NUMPY_RULES)  # the ops the Numba generator runs


def _needed(graph: Graph, target: Vertex) -> list[Vertex]:
    """The vertices one step of ``target`` needs, through delays too, in step order."""
    need: set[str] = set()
    stack = [target]
    while stack:
        v = stack.pop()
        if v.name in need:
            continue
        need.add(v.name)
        if v.kind == "delay":
            stack.append(v.source)
        elif v.kind == "op":
            stack.extend(a for a in v.args if isinstance(a, Vertex))
    return [v for v in graph.step_order() if v.name in need]


def _rows_loop(B: int) -> bool:
    """Whether ``B`` rows are more than the Numba loop's own products take (their products are BLAS's)."""
    from .kernels.sampling import LOOP_ROWS

    return B > LOOP_ROWS


def _load_jit(code: str, name: str, spin: bool = False):
    """Generated loop ``name`` compiled by Numba, through the same on-disk cache as the training loops."""
    from unrolled.engines.compiled.kernels.jitcache import load_module

    text = LOOP_IMPORTS + (SPIN_IMPORT if spin else "") + "\n@numba.njit(cache=True, nogil=True, error_model=\"numpy\")\n" + code
    return load_module(text, name)[name]


# What a generated loop's module imports (benchmarks/stretches.py compiles a loop with them too)
LOOP_IMPORTS = ("import numba\nimport numpy as np\nfrom unrolled.engines.compiled.kernels.arrays import *  # noqa: F401,F403\n"
                "from unrolled.engines.compiled.kernels.scalars import cast, sigmoid1, tanh1  # noqa: F401\n"
                "from unrolled.engines.compiled.kernels.sampling import *  # noqa: F401,F403\n")
SPIN_IMPORT = "from unrolled.engines.compiled.kernels.spin import barrier  # noqa: F401\n"


def _jit_wanted(jit, order) -> bool:
    unsupported = {v.op for v in order if v.kind == "op"} - JIT_OPS
    return numba_allowed(jit, unsupported, "the JIT generator")


def _dtype(params) -> np.dtype:
    dtypes = {np.asarray(a).dtype for a in params.values()}
    return dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float64)


def _buffer_args(code: str) -> list[str]:
    """The buffers generated code reads (states, rings, parameters, weights), in argument order."""
    return sorted(tok for tok in _identifiers(code) if tok[:2] in ("S_", "R_", "P_", "W_", "E_"))


def _identifiers(text: str) -> set[str]:
    import re

    # a buffer's name, or a thread's copy of some of a product's weights' columns (feedsplit.columns_name)
    return set(re.findall(rf"\b[A-Z]_[a-z]\d+(?:{feedsplit.COLUMNS_SUFFIX})?\b", text))
