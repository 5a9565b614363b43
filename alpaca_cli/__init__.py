"""alpaca: Stanford-Alpaca-style instruction tuning on Levanter."""

__version__ = "0.1.0"
