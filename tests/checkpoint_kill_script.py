"""Save a clean checkpoint at step 2, then hang half-way through the save at step 4 (to be SIGKILLed).

Usage: ``python checkpoint_kill_script.py DIRPATH MARKER``. The second save writes half of the
real bytes into its temporary file, flushes them, creates ``MARKER`` and sleeps; the test kills the
process then and checks that the step-2 checkpoint survived.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import torch
from checkpoint_setup import SaveAt, fit

REAL_SAVE = torch.save


def main(dirpath: str, marker: str) -> None:
    def stall_half_way(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        REAL_SAVE(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        Path(marker).write_text(str(len(data)))
        time.sleep(600)

    def before(step: int) -> None:
        if step == 4:
            torch.save = stall_half_way

    fit(dirpath, [SaveAt(dirpath, steps=[2, 4], before=before)], max_steps=6)
    print("finished without being killed", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
