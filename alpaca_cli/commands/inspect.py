"""placeholder"""
EXAMPLES = ""


def inspect() -> None:
    """TODO"""
