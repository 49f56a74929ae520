"""`python -m clusterlm.train ...` (what torchrun starts on every rank) == `clusterlm train ...`."""

import sys

from clusterlm.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
