"""Not built yet."""


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    raise RuntimeError("'demo' is not available yet")
