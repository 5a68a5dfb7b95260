"""``python -m memwatch ...``: the ``memwatch`` command line (:mod:`memwatch.cli`)."""

import sys

from memwatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
