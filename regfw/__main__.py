"""``python -m regfw``: the same as the ``regfw`` command."""
import sys

from regfw.cli.main import main

sys.exit(main())
