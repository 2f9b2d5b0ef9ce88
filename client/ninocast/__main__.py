"""`python -m ninocast` is the `ninocast` command."""

import sys

from .cli import main

sys.exit(main())
