"""Drop the known import-time log lines of torchao, which transformers imports when it is there.

torchao (installed beside transformers for the benchmarks) logs, when transformers first
builds a model and so imports it:

- ``Failed to load .../torchao/_C_*.so: ...`` (logger ``torchao``) for each of its kernel
  libraries built for another Python or GPU, which this machine cannot load and netshrink
  never calls;
- ``<enum '...'> is an Enum subclass and is now natively supported by torch.compile ...
  register_constant() on Enum subclasses is deprecated`` (logger ``torch.utils._pytree``) for
  each of torchao's enums it registers as a pytree constant.

Every ``hf:`` command printed them. :func:`quiet_torchao` adds a filter to those two loggers
that drops exactly these messages; any other record of theirs (and every other logger) is
left alone.
"""

from __future__ import annotations

import logging

TORCHAO_LOGGER = "torchao"
PYTREE_LOGGER = "torch.utils._pytree"


def _is_torchao_noise(record: logging.LogRecord) -> bool:
    """Whether ``record`` is one of the two known torchao import messages."""
    if record.name == TORCHAO_LOGGER:
        text = record.getMessage()
        return text.startswith("Failed to load ") and ".so" in text
    if record.name == PYTREE_LOGGER and "is an Enum subclass" in str(record.msg):
        subject = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return getattr(subject, "__module__", "").startswith("torchao")
    return False


class _TorchaoNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_torchao_noise(record)


_FILTER = _TorchaoNoise()


def quiet_torchao() -> None:
    """Drop torchao's known import-time messages from now on (idempotent)."""
    for name in (TORCHAO_LOGGER, PYTREE_LOGGER):
        logging.getLogger(name).addFilter(_FILTER)
