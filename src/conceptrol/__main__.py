"""`python -m conceptrol ...`: the same as the `conceptrol` command."""

import sys

from .cli import main

sys.exit(main())
