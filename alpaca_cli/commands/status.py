"""placeholder"""
EXAMPLES = ""


def status() -> None:
    """TODO"""
