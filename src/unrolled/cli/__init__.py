"""The command line: ``unrolled SUBCOMMAND ...``, one small module per subcommand.

Each subcommand module has ``add_arguments(parser)`` and ``run(args) -> int``; a
module with ``FORWARDS_ARGUMENTS = True`` declares none and gets its command
line, help included, as ``args.forwarded`` (``bench``: the benchmark harness
parses its own, so its options live in one place).
:func:`main` turns a user's mistake (``ValueError``, ``OSError``) into one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unrolled import __version__
from unrolled.engines.compiled.kernels import compiling
from unrolled.train.interrupts import quit_on_signal

SUBCOMMANDS = {
    "train": "train a character-level language model on text files",
    "sample": "generate text from a trained checkpoint",
    "evaluate": "bits per character of a text under a checkpoint",
    "export": "write a model as ONNX or PyTorch weights, or PyTorch weights as a checkpoint",
    "draw": "draw the folded or the unrolled graph",
    "diagnose": "draw gradients through time",
    "gradcheck": "check a network's gradients against finite differences",
    "bench": "time unrolled against PyTorch, JAX and NumPy",
    "demo": "the classic Elman network, printed, unrolled and trained briefly",
}


class UsageError(Exception):
    """A mistake in the command line itself (exit code 2)."""


SEED_LIMIT = 2**63  # NumPy's generators take seeds from 0 up to this, exclusive


def seed(text: str) -> int:
    """The argparse type of every --seed: refused while parsing, so the message names the flag
    (NumPy's own "expected non-negative integer" names nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 to 2**63 - 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unrolled",
        description="Recurrent networks as cyclic graphs with delay edges, unrolled in time, trained by BPTT.",
    )
    parser.add_argument("--version", action="version", version=f"unrolled {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = _module(name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter, add_help=not _forwards(module))
        module.add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"unrolled.cli.{name}_cmd")


def _forwards(module) -> bool:
    return getattr(module, "FORWARDS_ARGUMENTS", False)


def _compiling_notice() -> None:
    """Said once, when Numba first compiles: the pause that follows is not a hang."""
    from tqdm import tqdm

    tqdm.write("compiling (first run only)…", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C or SIGTERM ends a command at once, never as an exception unwinding through native code
    # (interrupts.py); a training loop takes them over to stop and save.
    # argv None: the process's own command line, which ends when the command does
    with quit_on_signal("unrolled", exiting=argv is None):
        _matplotlib_config()
        return _main(argv)


def _matplotlib_config() -> None:
    """Without a writable home, Matplotlib warns in three lines and makes a new temporary folder each run;
    give it one beside our cache instead (the Numba cache's warning already says where that is)."""
    import os

    from unrolled.engines.compiled.kernels.jitcache import cache_root, writable

    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    if os.environ.get("MPLCONFIGDIR") or writable(os.path.join(xdg, "matplotlib")):
        return
    try:
        os.environ["MPLCONFIGDIR"] = str(cache_root() / "matplotlib")
    except OSError:  # nowhere to write at all: Matplotlib's own fallback and warning
        pass


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command and _forwards(_module(args.command)):
            args.forwarded = extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code or 0)
    if not args.command:
        parser.print_help()
        return 2
    compiling.set_notice(_compiling_notice)
    try:
        return int(_module(args.command).run(args) or 0)
    except BrokenPipeError:  # `unrolled sample ... | head`: the reader has seen enough
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as e:
        print(f"unrolled {args.command}: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        print(f"unrolled {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"unrolled {args.command}: interrupted", file=sys.stderr)
        return 130
