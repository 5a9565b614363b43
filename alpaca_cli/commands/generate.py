"""placeholder"""
EXAMPLES = ""


def generate() -> None:
    """TODO"""
