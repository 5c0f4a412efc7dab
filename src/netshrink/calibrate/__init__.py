"""Calibration: what a model's layers see on calibration data, gathered in one pass.

:mod:`~netshrink.calibrate.reducers` are bounded running statistics, :mod:`~.collect` hooks
them on named modules and streams the batches, :mod:`~.sequential` runs data-aware methods one
block at a time on the inputs the already compressed blocks produce (:mod:`~.staged`: layer stage
by layer stage, paired with the full-precision model's inputs), :mod:`~.hessian` is the
damped inverse-Hessian factor GPTQ and SparseGPT share. Padding tokens (attention mask 0) never
enter the token statistics.
"""

from netshrink.calibrate.collect import (
    Hooks,
    Points,
    collect,
    first_tensor,
    token_mask,
)
from netshrink.calibrate.hessian import damped_inverse_cholesky, relative_output_error
from netshrink.calibrate.reducers import (
    Capture,
    Gram,
    Latest,
    MinMax,
    Observe,
    Reducer,
    Shape,
    SumSquares,
    input_vectors,
    real_tokens,
)
from netshrink.calibrate.sequential import (
    BlockCompressor,
    PerLayer,
    SequentialReport,
    find_blocks,
    run_blocks,
)

__all__ = [
    "BlockCompressor",
    "Capture",
    "Gram",
    "Hooks",
    "Latest",
    "MinMax",
    "Observe",
    "PerLayer",
    "Points",
    "Reducer",
    "SequentialReport",
    "Shape",
    "SumSquares",
    "collect",
    "damped_inverse_cholesky",
    "find_blocks",
    "first_tensor",
    "input_vectors",
    "real_tokens",
    "relative_output_error",
    "run_blocks",
    "token_mask",
]
