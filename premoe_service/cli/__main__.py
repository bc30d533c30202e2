"""`python -m premoe_service.cli`: the same as the `premoe` command."""

import sys

from . import main

sys.exit(main())
