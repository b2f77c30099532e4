from realsyn_pl.cli import entry

entry()
