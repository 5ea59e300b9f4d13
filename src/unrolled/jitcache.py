"""Where generated Numba code lives: files in a cache folder, so Numba can cache it compiled.

Numba keeps compiled functions only for functions defined in files; the
engine's loops and fused kernels are generated text. Each text is written
once (named by its hash) under ``$UNROLLED_CACHE``, else ``~/.cache/unrolled``,
else the temporary folder, and imported from there.
"""

from __future__ import annotations

import functools
import os
import sys

def _load_module(text: str, prefix: str) -> dict:
    """Import generated Numba code from a file in the cache folder (so Numba can cache it); its names."""
    import hashlib
    import importlib.util

    from .jitkernels import PRODUCTS

    text = f"# unrolled kernels {_kernels_fingerprint()}, products: {PRODUCTS}\n" + text
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    path = _cache_folder() / f"{prefix}_{digest}.py"
    if not path.exists():
        from .atomic import atomic_write_text

        atomic_write_text(path, text)
    spec = importlib.util.spec_from_file_location(f"unrolled_{prefix}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


@functools.cache
def _kernels_fingerprint() -> str:
    """A hash of the kernel modules that generated code calls. Numba's disk cache checks only the
    generated file itself, not the kernels compiled into it: a changed kernel (a new version of
    unrolled) must give the generated text, hence its file, a new name, or the old machine code runs."""
    import hashlib
    from pathlib import Path

    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("jitkernels.py", "rowkernels.py", "blas.py", "onednn.py", "optim_kernels.py", "generate_kernels.py"):
        path = here / name
        h.update(path.read_bytes() if path.exists() else name.encode())
    return h.hexdigest()[:16]


def _load_jit_loops(source: str) -> dict:
    """The generated loops, compiled by Numba, each wrapped to take its buffers from a dict."""
    head = "import numba\nimport numpy as np\nfrom unrolled.jitkernels import *  # noqa: F401,F403\n\n"
    module = _load_module(head + source, "loops")
    ns = {}
    for fn in ("forward_loop", "backward_loop"):
        compiled = module[fn]
        names = compiled.py_func.__code__.co_varnames[2:compiled.py_func.__code__.co_argcount]
        ns[fn] = _binder(compiled, names)
    return ns


def _binder(compiled, names):
    def call(t0, t1, bind):
        return compiled(t0, t1, *[bind[n] for n in names])

    return call


def _cache_folder():
    """Where generated JIT loops live: $UNROLLED_CACHE, else ~/.cache/unrolled, else a temporary folder."""
    import tempfile
    from pathlib import Path

    for candidate in (os.environ.get("UNROLLED_CACHE"), os.path.join(os.path.expanduser("~"), ".cache", "unrolled"),
                      os.path.join(tempfile.gettempdir(), "unrolled-cache")):
        if not candidate:
            continue
        folder = Path(candidate) / "jit"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_text("")
            probe.unlink()
            return folder
        except OSError:
            continue
    raise OSError("no writable folder for the JIT cache: set UNROLLED_CACHE to one, or use jit=False")


def numba_allowed(jit, unsupported: set[str], what: str, env_refuses: tuple[str, ...] = ("0",)) -> bool:
    """May ``what`` run under Numba? ``jit=True`` insists and says why not; "auto" quietly declines.

    ``UNROLLED_JIT`` set to one of ``env_refuses`` keeps "auto" off Numba (the tests set "0").
    """
    if jit is False or (jit is not True and os.environ.get("UNROLLED_JIT", "1") in env_refuses):
        return False
    if unsupported:
        if jit is True:
            raise ValueError(f"{what} cannot run {', '.join(sorted(unsupported))}; use jit=False or 'auto'")
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        if jit is True:
            raise ValueError("jit=True needs Numba: pip install numba") from None
        return False
    return True
