"""`python -m quadapt.cli`: the `quadapt` console script."""

import sys

from . import main

sys.exit(main())
