"""``python -m opsd_core``: the ``opsd`` command line, for when the console script is not on PATH.

Owns nothing but the hand-over to :func:`opsd_core.cli.main`.
"""

from opsd_core.cli import main

if __name__ == "__main__":
    main()
