"""``python -m netshrink``: the same command line as the ``netshrink`` script."""

from netshrink.cli import main

main()
