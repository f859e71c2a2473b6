"""Where the recordings of what itwinai 0.4.2 itself does live: one directory, one file per
part, written by `scripts/record_itwinai_reference.py` (which imports this) and read by the
tests that compare with them. Nothing here names a machine: itwinai's Python is given to the
script by --itwinai-python or ITWINAI_PYTHON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
#: Each part: what its recording holds is described in the script's docstring.
RECORDINGS = {part: REFERENCE_DIR / f"{part}-itwinai-0.4.2.json"
              for part in ("loggers", "trackers", "mlflow")}


def load(part: str) -> Any:
    """The recording of `part` (one of RECORDINGS)."""
    return json.loads(RECORDINGS[part].read_text())
