"""Not built yet."""


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    raise RuntimeError("'diagnose' is not available yet")
