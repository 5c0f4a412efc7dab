"""Built-in reference models (``zoo:<name>``), trained on first use and cached.

>>> import netshrink.zoo as zoo
>>> model = zoo.load("digits-cnn")            # trains once (seconds), then loads from cache
>>> splits = zoo.data("digits-cnn")           # .train .val .test .calib batches
>>> zoo.evaluate("digits-cnn")(model, splits.test)
"""

from netshrink.zoo.catalog import (
    build,
    data,
    describe,
    evaluate,
    example_inputs,
    load,
    name_of,
    names,
)

__all__ = ["build", "data", "describe", "evaluate", "example_inputs", "load", "name_of", "names"]
