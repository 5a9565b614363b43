"""placeholder"""
EXAMPLES = ""


def export() -> None:
    """TODO"""
