"""``python -m clipforge`` (and ``torchrun -m clipforge``) runs the command line."""

import sys

from clipforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
