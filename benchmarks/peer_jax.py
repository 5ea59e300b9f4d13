"""JAX peer (optional): `lax.scan` over time, `value_and_grad`, one jitted step.

Written the way a competent JAX user writes it without optax: the model is a
dict of arrays; each recurrent layer is one `lax.scan`, with its input
projection hoisted out of the loop as one large product and the output layer
applied to all steps at once; Adam and Adagrad are a few lines of
`jax.numpy`. The training step is compiled ahead of time (`lower().compile()`)
so compile time is reported separately as `compile_s` and never timed.
Sampling is one compiled scan over the whole generation with
`jax.random.categorical`.

The training loop never waits for an update: JAX dispatches asynchronously,
so Python prepares and dispatches the next chunk while the previous update
still runs, which is what every JAX user gets without asking. The protocol's
`sync` waits once, at the end of each timed repetition, so a repetition's
clock stops only when all of its updates are done. Parameters, optimizer
state and the carried recurrent state are donated to the step (updated in
place); Adagrad/Adam and the clipping are inside the one compiled update.

W6 (start) times the same update from a fresh process: import, build,
compile and run it once; with `JAX_COMPILATION_CACHE_DIR` set (the harness
does, for the warm run) the compiled update comes from JAX's persistent cache.
"""

from __future__ import annotations

import time

import numpy as np

from .corpus import Chunks, Corpus
from .protocol import Protocol, peak_rss_during, time_steps
from .workloads import Workload


def run(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    if workload.kind == "sample":
        return _sample(workload, corpus, protocol)
    if workload.kind == "start":
        return _first_update(workload, corpus, protocol)
    return _train(workload, corpus, protocol)


# ---------------------------------------------------------------------------
# model


def _init(workload: Workload, V: int, key) -> dict:
    """Uniform(-1/sqrt(H), 1/sqrt(H)) everywhere, as torch initialises RNNs."""
    import jax
    import jax.numpy as jnp

    H = workload.hidden
    gates = 4 if workload.cell == "lstm" else 1
    k = 1 / np.sqrt(H)
    shapes = {}
    for l in range(workload.layers):
        shapes[f"Wx{l}"] = (V if l == 0 else H, gates * H)
        shapes[f"Wh{l}"] = (H, gates * H)
        shapes[f"b{l}"] = (gates * H,)
    shapes["Wy"] = (H, V)
    shapes["by"] = (V,)
    keys = jax.random.split(key, len(shapes))
    return {name: jax.random.uniform(kk, shape, jnp.float32, -k, k)
            for kk, (name, shape) in zip(keys, shapes.items())}


def _zero_state(workload: Workload, B: int):
    import jax.numpy as jnp

    shape = (workload.layers, B, workload.hidden)
    if workload.cell == "lstm":   # two buffers: the step donates its state
        return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
    return jnp.zeros(shape, jnp.float32)


def _layer(cell: str, Wh, xp, state):
    """One recurrent layer over all steps. xp: [T, B, gates*H] input projection."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    if cell == "elman":
        def step(h, xp_t):
            h = jnp.tanh(xp_t + h @ Wh)
            return h, h
        return lax.scan(step, state, xp)

    H = Wh.shape[0]

    def step(hc, xp_t):
        h, c = hc
        z = xp_t + h @ Wh                       # [B, 4H], gate columns i, f, g, o
        i = jax.nn.sigmoid(z[:, :H])
        f = jax.nn.sigmoid(z[:, H : 2 * H])
        g = jnp.tanh(z[:, 2 * H : 3 * H])
        o = jax.nn.sigmoid(z[:, 3 * H :])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h

    return lax.scan(step, state, xp)


def _forward(workload: Workload, params: dict, state, x):
    """x [T, B] int -> logits [T, B, V], final state."""
    import jax
    import jax.numpy as jnp

    V = params["by"].shape[0]
    inp = jax.nn.one_hot(x, V, dtype=jnp.float32)           # [T, B, V]
    finals = []
    for l in range(workload.layers):
        xp = inp @ params[f"Wx{l}"] + params[f"b{l}"]      # hoisted out of the scan
        if workload.cell == "lstm":
            s, inp = _layer("lstm", params[f"Wh{l}"], xp, (state[0][l], state[1][l]))
        else:
            s, inp = _layer("elman", params[f"Wh{l}"], xp, state[l])
        finals.append(s)
    if workload.cell == "lstm":
        final = (jnp.stack([h for h, _ in finals]), jnp.stack([c for _, c in finals]))
    else:
        final = jnp.stack(finals)
    return inp @ params["Wy"] + params["by"], final


# ---------------------------------------------------------------------------
# optimizers and clipping, by hand


def _clip(workload: Workload, grads: dict) -> dict:
    import jax
    import jax.numpy as jnp

    c = workload.clip_at
    if workload.clip == "value":
        return jax.tree.map(lambda g: jnp.clip(g, -c, c), grads)
    if workload.clip == "norm":
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        scale = jnp.minimum(1.0, c / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale, grads)
    return grads


def _opt_init(workload: Workload, params: dict):
    import jax
    import jax.numpy as jnp

    zeros = jax.tree.map(jnp.zeros_like, params)
    if workload.optimizer == "adagrad":
        return {"mem": zeros}
    return {"m": zeros, "v": jax.tree.map(jnp.zeros_like, params), "t": jnp.zeros((), jnp.float32)}


def _opt_update(workload: Workload, params: dict, grads: dict, opt: dict):
    import jax
    import jax.numpy as jnp

    lr = workload.lr
    if workload.optimizer == "adagrad":   # min-char-rnn's Adagrad
        mem = jax.tree.map(lambda m, g: m + g * g, opt["mem"], grads)
        params = jax.tree.map(lambda p, g, m: p - lr * g / jnp.sqrt(m + 1e-8), params, grads, mem)
        return params, {"mem": mem}
    b1, b2, eps = 0.9, 0.999, 1e-8         # torch.optim.Adam defaults
    t = opt["t"] + 1
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, opt["m"], grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, opt["v"], grads)
    step = lr / (1 - b1**t)
    vhat_scale = 1 / (1 - b2**t)
    params = jax.tree.map(lambda p, m, v: p - step * m / (jnp.sqrt(v * vhat_scale) + eps), params, m, v)
    return params, {"m": m, "v": v, "t": t}


# ---------------------------------------------------------------------------
# training (W1-W3) and the memory step (W5)


def _compiled_update(workload: Workload, corpus: Corpus, protocol: Protocol):
    """Parameters, optimizer state, carried state, the chunks, and the compiled update.

    The update is one jitted function (forward, loss, backward, clipping,
    optimizer) that donates its parameters, optimizer state and carried
    state, so XLA updates them in place. It is compiled ahead of time
    (`lower().compile()`), so its compile time can be reported apart.
    """
    import jax
    import jax.numpy as jnp

    V, T, B = corpus.V, workload.T, workload.B
    params = _init(workload, V, jax.random.PRNGKey(protocol.seed))
    opt = _opt_init(workload, params)
    state = _zero_state(workload, B)
    chunks = Chunks(corpus, T, B)

    def loss_fn(params, state, x, y):
        logits, final = _forward(workload, params, state, x)
        logp = jax.nn.log_softmax(logits)                                   # [T, B, V]
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)             # [T, B, 1]
        loss = jnp.sum(nll) if workload.reduction == "sum" else jnp.mean(nll)
        return loss, final

    def train_step(params, opt, state, x, y):
        (loss, final), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        params, opt = _opt_update(workload, params, _clip(workload, grads), opt)
        return params, opt, final, loss

    t0 = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(
        params, opt, state, chunks.x[0], chunks.y[0]).compile()
    return params, opt, state, chunks, compiled, time.perf_counter() - t0


def _train(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    import jax

    t0 = time.perf_counter()
    params, opt, state, chunks, compiled, compile_s = _compiled_update(workload, corpus, protocol)
    setup_s = time.perf_counter() - t0 - compile_s

    def step():
        """Dispatch one update and return its (lazy) loss; never wait for it."""
        nonlocal params, opt, state
        x, y = chunks.next()
        params, opt, state, loss = compiled(params, opt, state, x, y)
        return loss

    def sync():
        jax.block_until_ready((params, opt, state))

    if workload.kind == "memory":
        def one_step():
            step()
            sync()
        out = peak_rss_during(one_step)
    else:
        scale = 1.0 / (workload.T * workload.B) if workload.reduction == "sum" else 1.0
        out = time_steps(step, protocol, workload.T * workload.B, sync=sync, loss_scale=scale)
    out["setup_s"] = setup_s
    out["compile_s"] = compile_s
    return out


def _first_update(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    """W6: build, compile and run one update; the harness times it from the process's start."""
    import jax

    params, opt, state, chunks, compiled, compile_s = _compiled_update(workload, corpus, protocol)
    x, y = chunks.next()
    params, opt, state, loss = compiled(params, opt, state, x, y)
    jax.block_until_ready((params, opt, state, loss))
    return {"end_time": time.time(), "compile_s": compile_s, "loss": float(loss)}


# ---------------------------------------------------------------------------
# sampling (W4)


def _sample(workload: Workload, corpus: Corpus, protocol: Protocol) -> dict:
    import jax

    key, init_key = jax.random.split(jax.random.PRNGKey(protocol.seed))
    params = _init(workload, corpus.V, init_key)
    generate = sampler(workload, corpus)

    t0 = time.perf_counter()
    compiled = jax.jit(generate).lower(params, key).compile()
    compile_s = time.perf_counter() - t0

    def step():
        nonlocal key
        out, key = compiled(params, key)
        out.block_until_ready()          # the caller wants the text now
        return None                      # sampling has no loss

    out = time_steps(step, protocol, workload.T * workload.B)
    out["compile_s"] = compile_s
    return out


def sampler(workload: Workload, corpus: Corpus):
    """``generate(params, key) -> (tokens, key)``, to be jitted: ``workload.T`` characters of each
    of ``workload.B`` streams (tokens ``[T]`` at one stream, ``[T, B]`` at several), every stream
    from the seed character; one `lax.scan` whose step runs the whole batch, as `jax.random.categorical`
    draws a row's token from each row of ``[B, V]`` logits."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    H, L, B = workload.hidden, workload.layers, workload.B
    batch = () if B == 1 else (B,)   # one stream keeps vectors, as a user sampling one text writes it
    first = jnp.full(batch, corpus.index(workload.seed_char), jnp.int32)
    inv_temp = 1.0 / workload.temperature

    def lstm_cell(Wx_row_or_proj, Wh, h, c):
        z = Wx_row_or_proj + h @ Wh                  # [..., 4H], gate columns i, f, g, o
        i = jax.nn.sigmoid(z[..., :H])
        f = jax.nn.sigmoid(z[..., H : 2 * H])
        g = jnp.tanh(z[..., 2 * H : 3 * H])
        o = jax.nn.sigmoid(z[..., 3 * H :])
        c = f * c + i * g
        return o * jnp.tanh(c), c

    def generate(params, key):
        key, sub = jax.random.split(key)
        keys = jax.random.split(sub, workload.T)

        def body(carry, k):
            hs, cs, ix = carry
            new_h, new_c = [], []
            x = params["Wx0"][ix] + params["b0"]        # one-hot input = a row of W_x
            for l in range(L):
                if l > 0:
                    x = new_h[-1] @ params[f"Wx{l}"] + params[f"b{l}"]
                h, c = lstm_cell(x, params[f"Wh{l}"], hs[l], cs[l])
                new_h.append(h)
                new_c.append(c)
            logits = new_h[-1] @ params["Wy"] + params["by"]
            ix = jax.random.categorical(k, logits * inv_temp)
            return (jnp.stack(new_h), jnp.stack(new_c), ix), ix

        zeros = jnp.zeros((L, *batch, H), jnp.float32)
        _, out = lax.scan(body, (zeros, zeros, first), keys)
        return out, key

    return generate
