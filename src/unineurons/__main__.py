"""``python -m unineurons``: the same command line as the ``unineurons`` script."""

from .cli import main

main()
