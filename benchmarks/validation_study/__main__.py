"""``python -m validation_study`` (from ``benchmarks/``): the same as ``python benchmarks/validation.py``."""

import sys

from .cli import main

sys.exit(main())
