"""``python -m sharding``: see ``sharding.cli``."""

import sys

from sharding.cli import main

sys.exit(main())
