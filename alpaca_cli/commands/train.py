"""placeholder"""
EXAMPLES = ""


def train() -> None:
    """TODO"""
