"""`python -m omni_tasks.cli`: the `omni-tasks` command without its console script."""

import sys

from omni_tasks.cli.parser import main

sys.exit(main())
