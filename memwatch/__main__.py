"""``python -m memwatch ...``: the ``memwatch`` command line (:mod:`memwatch.apps.cli`)."""

import sys

from memwatch.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
