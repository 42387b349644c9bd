"""``python -m lmfuse ...`` is the ``lmfuse`` command (see :mod:`lmfuse.cli`)."""

import sys

from lmfuse.cli import main

if __name__ == "__main__":
    sys.exit(main())
