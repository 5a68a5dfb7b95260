"""Validation study v2: does memwatch detect memorization, and when?

The study lives in the package ``benchmarks/validation_study/`` (its docstring describes the
runs, the analysis and the report); this file is its command line::

    python benchmarks/validation.py                      # default size, writes docs/
    python benchmarks/validation.py --fast               # CI smoke size, writes memwatch_out/validation-fast/
    python benchmarks/validation.py --cache runs.pt      # also save the recorded checks
    python benchmarks/validation.py --from-cache runs.pt # analysis only, no training
    python benchmarks/validation.py --seeds 2 --cache fresh.pt                  # fresh seeds, trained only
    python benchmarks/validation.py --from-cache runs.pt --fresh-cache fresh.pt # report with them
"""

import sys

from validation_study.cli import main  # benchmarks/ is on sys.path when this file runs as a script

if __name__ == "__main__":
    sys.exit(main())
