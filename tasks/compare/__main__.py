"""``python -m tasks.compare``: see :mod:`tasks.compare.cli`."""
import sys

from .cli import main

sys.exit(main())
