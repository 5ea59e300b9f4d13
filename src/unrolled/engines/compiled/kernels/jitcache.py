"""Where generated Numba code lives: files in a cache folder, so Numba can cache it compiled.

Numba keeps compiled functions only for functions defined in files; the
engine's loops and fused kernels are generated text. Each text is written
once (named by its hash) under ``$UNROLLED_CACHE``, else ``~/.cache/unrolled``,
else the temporary folder, and imported from there.

The kernel modules' own cached functions are keyed the same way: Numba
checks a cached function against its own file only, so the machine code of a
function that compiled in another kernel module's function (the row kernels'
``tanh_row`` inlines scalars.py's ``tanh1``) outlived a change to that
function. :func:`prepare_numba_cache` puts their caches in a folder named by
:func:`_kernels_fingerprint`, a hash of every kernel module, under
``NUMBA_CACHE_DIR`` when that is set, else beside the generated code. Where
Numba cannot cache beside a source nor under ``~/.cache/numba`` (a read-only
install run by an account without a home) it also points ``NUMBA_CACHE_DIR``
at the folder above, with one warning.
"""

from __future__ import annotations

import functools
import os
import sys


@functools.cache
def prepare_numba_cache() -> None:
    """Make sure Numba has a folder to cache compiled code in, before any ``cache=True`` function is defined.

    Numba refuses to define such a function when it can write neither beside the source nor under
    ``~/.cache/numba`` ("cannot cache function ...: no locator available"), and every command would die
    on import. Then the cache goes to our own cache folder, and one line on stderr says so. First of all,
    the kernel modules' caches are keyed by the fingerprint of every kernel module (:func:`_key_kernel_caches`)."""
    _key_kernel_caches()
    if os.environ.get("NUMBA_CACHE_DIR"):  # the user's choice
        return
    from pathlib import Path

    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if writable(Path(__file__).parent / "__pycache__") or writable(Path(xdg) / "numba"):
        return
    folder = cache_root() / "numba"
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    if "numba" in sys.modules:  # Numba read its configuration when it was imported
        sys.modules["numba"].core.config.CACHE_DIR = str(folder)
    print(f"unrolled: warning: neither the package's folder nor {xdg} is writable; Numba caches compiled code "
          f"in {folder} (set NUMBA_CACHE_DIR to choose another)", file=sys.stderr)


def writable(folder) -> bool:
    """Can files be made in ``folder`` (created if missing)?"""
    from pathlib import Path

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def load_module(text: str, prefix: str) -> dict:
    """Import generated Numba code from a file in the cache folder (so Numba can cache it); its names."""
    import hashlib
    import importlib.util

    from .arrays import PRODUCTS

    text = f"# unrolled kernels {_kernels_fingerprint()}, products: {PRODUCTS}\n" + text
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    path = _cache_folder() / f"{prefix}_{digest}.py"
    if not path.exists():
        from unrolled.atomic import atomic_write_text

        atomic_write_text(path, text)
    prepare_numba_cache()
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

    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):  # every kernel module: none can be forgotten
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def load_jit_loops(source: str) -> dict:
    """The generated loops, compiled by Numba, each wrapped to take its buffers from a dict."""
    head = "import numba\nimport numpy as np\nfrom unrolled.engines.compiled.kernels.arrays import *  # noqa: F401,F403\n\n"
    module = load_module(head + source, "loops")
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


def cache_root():
    """The folder our caches live under (:func:`_cache_folder`'s parent)."""
    return _cache_folder().parent


def _cache_folder(name: str = "jit", *preferred: str):
    """The first writable folder ``name`` in: ``preferred``, $UNROLLED_CACHE, ~/.cache/unrolled, a temporary folder.
    (Generated JIT loops live in "jit".)"""
    import tempfile
    from pathlib import Path

    home = os.path.join(os.path.expanduser("~"), ".cache", "unrolled")
    temporary = os.path.join(tempfile.gettempdir(), "unrolled-cache")
    for candidate in (*preferred, os.environ.get("UNROLLED_CACHE"), home, temporary):
        if not candidate:
            continue
        folder = Path(candidate) / name
        if writable(folder):
            return folder
    raise OSError("no writable folder for the JIT cache: set UNROLLED_CACHE to one, or use jit=False")


def _key_kernel_caches() -> None:
    """Make Numba cache the kernel modules' functions under the fingerprint of all of them.

    Done before any cached function is defined (Numba picks a function's cache
    folder then). Numba's own locators key a cache by the defining file alone,
    so a changed callee in another kernel module (a new version of unrolled, an
    edit) left the caller's old machine code running.
    """
    from numba.core import caching

    locators = (getattr(caching, "CacheImpl", None) or caching._CacheImpl)._locator_classes  # _CacheImpl in older Numba
    if _kernel_locator() not in locators:
        locators.insert(0, _kernel_locator())  # before NUMBA_CACHE_DIR's, which would take every file


@functools.cache
def _kernel_locator():
    """The Numba cache locator for the modules of this folder, the kernels (a class made on first use: this module imports no Numba)."""
    from numba.core import caching, config

    here = os.path.dirname(os.path.realpath(__file__))

    class KernelCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
        """A kernel module's cache: ``kernels-<fingerprint>`` under NUMBA_CACHE_DIR/unrolled when that is
        set, else beside the generated loops' folder; ``None`` (Numba's own locators) for any other file."""

        def __init__(self, py_func, py_file, folder):
            self._py_file, self._lineno, self._folder = py_file, py_func.__code__.co_firstlineno, folder

        def get_cache_path(self):
            return self._folder

        @classmethod
        def from_function(cls, py_func, py_file):
            real = os.path.realpath(py_file)
            if os.path.dirname(real) != here:  # generated loops live elsewhere, and have their own
                return None
            preferred = [os.path.join(config.CACHE_DIR, "unrolled")] if config.CACHE_DIR else []
            try:
                return cls(py_func, py_file, str(_cache_folder(f"kernels-{_kernels_fingerprint()}", *preferred)))
            except OSError:  # nowhere writable: Numba's own locators decide
                return None

    return KernelCacheLocator


def jit_turned_off() -> bool:
    """Whether the user turned Numba off for this process (``UNROLLED_JIT=0``; 1, the default, leaves
    it on). Any other value is refused rather than read as one of the two: ``fuse`` once meant the
    NumPy loops with fused kernels, which is now ``CompiledEngine(graph, jit="fuse")``."""
    value = os.environ.get("UNROLLED_JIT", "1")
    if value not in ("0", "1"):
        raise ValueError(f"UNROLLED_JIT={value!r}: use 0 (no Numba anywhere) or 1 (the default); for the "
                         "NumPy loops with fused kernels, make the engine with jit='fuse'")
    return value == "0"


def numba_allowed(jit, unsupported: set[str], what: str) -> bool:
    """May ``what`` run under Numba? ``jit=True`` insists and says why not; "auto" quietly declines.

    ``UNROLLED_JIT=0`` keeps "auto" off Numba (the tests set it).
    """
    return numba_refusal(jit, unsupported, what) is None


def numba_refusal(jit, unsupported, what: str) -> str | None:
    """Why ``what`` may not run under Numba, in words (None: it may); :func:`numba_allowed`'s one rule,
    kept here so that ``CompiledEngine.explain`` reports the very condition that decided.

    ``unsupported``: the ops ``what`` cannot run, or a function that finds them, called only where
    Numba is not already ruled out (finding them may import the module of a path that needs Numba)."""
    if jit is False:
        return "jit=False"
    if jit is not True and jit_turned_off():
        return "UNROLLED_JIT=0 turns Numba off"
    if callable(unsupported):
        unsupported = unsupported()
    if unsupported:
        if jit is True:
            raise ValueError(f"{what} cannot run {', '.join(sorted(unsupported))}; use jit=False or 'auto'")
        return f"{what} cannot run {', '.join(sorted(unsupported))}"
    if not numba_installed():
        if jit is True:
            raise ValueError('jit=True needs Numba: pip install "unrolled[fast]"') from None
        return 'Numba is not installed (pip install "unrolled[fast]")'
    return None


def numba_installed() -> bool:
    """Whether Numba can be imported, found without importing it: an engine that starts on the NumPy
    loops (background.py) must not pay for Numba's import before its first run."""
    import importlib.util

    return importlib.util.find_spec("numba") is not None
