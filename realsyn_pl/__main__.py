import os
import sys

from realsyn_pl.cli import main

try:
    sys.exit(main())
except BrokenPipeError:
    # `python -m realsyn_pl fit --help | head`: the reader left; exit quietly as other Unix tools do.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(141)
