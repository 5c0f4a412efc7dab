"""Built-in data: seeded splits of labelled datasets as lists of ``(inputs, targets)`` batches."""

from netshrink.data.datasets import digits
from netshrink.data.splits import DataSplits

__all__ = ["DataSplits", "digits"]
