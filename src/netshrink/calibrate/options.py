"""Options shared by the techniques that calibrate one block at a time (GPTQ, AWQ, SparseGPT)."""

from __future__ import annotations

from pydantic import Field, model_validator

from netshrink.config import TechniqueConfig
from netshrink.targets import Targets


class BlockwiseConfig(TechniqueConfig):
    """Calibration batches, the optional sequential (block-by-block) engine and its blocks, and
    the layers to quantize. A subclass may redeclare ``sequential`` (its own default) or
    ``targets`` (more layer kinds)."""

    sequential: bool = Field(
        False, description="calibrate each block on the outputs of the compressed blocks before it"
    )
    blocks: tuple[str, ...] = Field(
        (), description="block module names (default: the repeated children of a ModuleList)"
    )
    calib_batches: int = Field(32, ge=1, le=100000, description="calibration batches used at most")
    targets: Targets = Field(
        default_factory=Targets, description="Linear/Conv1D layers to quantize"
    )

    @model_validator(mode="after")
    def _blocks_are_sequential(self) -> BlockwiseConfig:
        if self.blocks and not self.sequential:
            raise ValueError("blocks applies with sequential: true; set it or drop blocks")
        return self


class StagedConfig(BlockwiseConfig):
    """:class:`BlockwiseConfig` plus the refinements of the staged engine
    (:func:`netshrink.calibrate.staged.run_stages`), which need ``sequential``."""

    true_sequential: bool = Field(
        False,
        description="inside each block, calibrate each layer on the compressed ones before it",
    )
    asymmetric: bool = Field(
        False,
        description="GPTAQ's asymmetric calibration: each layer reconstructs the full-precision "
        "model's output from the compressed model's input (the calibration target, not the "
        "weight grid)",
    )

    @model_validator(mode="after")
    def _staged_is_sequential(self) -> StagedConfig:
        asked = [k for k in ("true_sequential", "asymmetric") if getattr(self, k)]
        if asked and not self.sequential:
            raise ValueError(f"{', '.join(asked)} need sequential: true; set it or drop them")
        return self
