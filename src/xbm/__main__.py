"""``python -m xbm``: the same CLI as the ``xbm`` console command (for machines where the
package is on ``PYTHONPATH`` but not installed)."""

import sys

from xbm.cli import main

sys.exit(main())
