"""Two revisions of the engine in one process, their training updates in turns: which is faster.

A change worth a few percent of an update is lost between processes: two
runs of the same code on this kind of machine differ by more than that, and
timings taken minutes apart drift further. This script loads the package as
it is at a git revision (``REV``) beside the working tree's, under another
name (``unrolled_rev``: every ``unrolled.`` import in its files renamed), and
runs the same workload's training updates on both in one process, in turns,
the order swapped every pair. It reports each side's median update and the
median of the paired ratios, working tree over ``REV``: below 1 the working
tree is faster. Each side builds its own graph, parameters, optimizer and
engine; the chunks of the corpus are the same. Numba compiles (or loads) each
side's loops under its own module names.

    python -m benchmarks.revisions HEAD~1 --workload W2 --pairs 600

Run by hand, on a quiet machine, like the rest of this folder; run the same
revision against itself first to see this machine's noise (a ratio within a
few tenths of a percent of 1).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from . import peer_unrolled

RENAMED = "unrolled_rev"
_IMPORTS = re.compile(r"\bunrolled(?=\.[a-z_])|(?<=from )unrolled(?= import )|(?<=import )unrolled\b")


def renamed(text: str) -> str:
    """A module's text with every import of ``unrolled`` (and its dotted names) made ``unrolled_rev``.

    Prose that names the project (``the unrolled graph``) is left as it is: only the package's
    dotted names and ``import unrolled`` / ``from unrolled import`` are rewritten."""
    return _IMPORTS.sub(RENAMED, text)


def extract(rev: str, into: Path, repo: Path) -> Path:
    """The package ``src/unrolled`` at ``rev``, written under ``into`` as ``unrolled_rev``."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "src/unrolled"],
                             check=True, capture_output=True).stdout
    package = into / RENAMED
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            path = package / Path(member.name).relative_to("src/unrolled")
            path.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member).read()
            path.write_bytes(renamed(data.decode()).encode() if member.name.endswith(".py") else data)
    return package


def trainer(package: str, workload, corpus):
    """``update()``: one training update of ``workload`` on ``package``'s engine, as the bench runs it
    (:func:`~benchmarks.peer_unrolled.trainer`), compiled in this process before the timing."""
    importlib.import_module(f"{package}.engines.compiled.background").set_enabled(False)
    return peer_unrolled.trainer(workload, corpus, 0, package).step


def in_turns(updates: dict, pairs: int, warmup: int) -> dict:
    """Each side's median update (ms) and the median of the pairs' ratios, working tree over the revision."""
    for _ in range(warmup):
        for update in updates.values():
            update()
    times = {side: [] for side in updates}
    ratios = []
    for i in range(pairs):
        got = {}
        for side in (("rev", "tree") if i % 2 else ("tree", "rev")):
            t0 = time.perf_counter()
            updates[side]()
            got[side] = time.perf_counter() - t0
        for side, t in got.items():
            times[side].append(t)
        ratios.append(got["tree"] / got["rev"])
    return {"rev_ms": statistics.median(times["rev"]) * 1e3, "tree_ms": statistics.median(times["tree"]) * 1e3,
            "tree_over_rev": statistics.median(ratios), "pairs": pairs}


def main(argv=None) -> None:
    from . import corpus as corpus_mod
    from . import workloads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the git revision to compare the working tree with (e.g. HEAD~1)")
    ap.add_argument("--workload", default="W2", help="a training workload (default W2)")
    ap.add_argument("--pairs", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    workload, corpus = workloads.get(args.workload), corpus_mod.load()
    with tempfile.TemporaryDirectory(prefix="unrolled-rev-") as folder:
        extract(args.rev, Path(folder), repo)
        sys.path.insert(0, folder)
        updates = {"rev": trainer(RENAMED, workload, corpus), "tree": trainer("unrolled", workload, corpus)}
        out = {"rev": subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", args.rev],
                                     check=True, capture_output=True, text=True).stdout.strip(),
               "workload": workload.id, **in_turns(updates, args.pairs, args.warmup)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
