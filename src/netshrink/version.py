"""netshrink's version, in a module of its own: recorded in artifacts and reports, which must
not import the package root (it imports every family)."""

__version__ = "0.1.0"
