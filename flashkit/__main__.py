"""`python -m flashkit ...` runs the flashkit command line (flashkit/cli.py)."""
import sys

from flashkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
