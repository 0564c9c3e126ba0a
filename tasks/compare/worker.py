"""Child process of the speed measurements: ``python -m tasks.compare.worker`` with a job as JSON on stdin.

Prints one line ``COMPARE_RESULT {json}`` on stdout; see :mod:`tasks.compare.speed`.
"""
from __future__ import annotations

import json
import sys

from .speed import RESULT_PREFIX, CellJob, measure_cell


def main() -> None:
    job = CellJob.from_json(sys.stdin.read())
    result = measure_cell(job)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result.to_dict()) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
