"""Command-line options shared by the flavor examples."""

from __future__ import annotations

import argparse
import dataclasses


def parse(config_cls, description: str, argv=None):
    """Every field of ``config_cls`` as a ``--flag`` (underscores become dashes), defaults from the dataclass."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config_cls):
        default = getattr(config_cls(), f.name)
        kind = type(default) if default is not None else (float if f.name.startswith("clip") else str)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default, metavar=kind.__name__.upper())
    return config_cls(**vars(parser.parse_args(argv)))
