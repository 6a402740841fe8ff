"""``python -m dpp.cli`` runs the `dpp` command (as the installed script does)."""

import sys

from dpp.cli.main import main

sys.exit(main())
