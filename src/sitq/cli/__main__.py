"""``python -m sitq.cli``: the same as the ``sitq`` console script."""

from sitq.cli import main

main()
