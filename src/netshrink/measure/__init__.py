"""Measure models: parameters, non-zeros, MACs, bytes on disk, latency, peak memory, a metric.

``measure(model, example_inputs)`` returns a :class:`Measurement`; ``compare(baseline,
candidate, example_inputs)`` a :class:`Comparison` with the compression rate, the speedup rate
and the metric drop. Both print as tables whose rows say what each figure means.
"""

from netshrink.measure.counts import count_macs, count_nonzero, count_params, count_stored_bits
from netshrink.measure.harness import compare, measure, saved_bytes
from netshrink.measure.latency import Latencies, time_interleaved, time_latency
from netshrink.measure.memory import peak_memory
from netshrink.measure.results import Comparison, Measurement
from netshrink.settings import MIN_RUNS, Timing

__all__ = [
    "MIN_RUNS",
    "Comparison",
    "Latencies",
    "Measurement",
    "Timing",
    "compare",
    "count_macs",
    "count_nonzero",
    "count_params",
    "count_stored_bits",
    "measure",
    "peak_memory",
    "saved_bytes",
    "time_interleaved",
    "time_latency",
]
