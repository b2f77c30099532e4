import sys

from realsyn_pl.cli import main

sys.exit(main())
