"""``python -m daunce_core.access.api.server``: run the server."""

import sys

from daunce_core.access.api.server.cli import main

sys.exit(main())
