"""``python -m megatron_sffn.planning``: the dry run (see :mod:`.report`)."""

import sys

from .report import main

sys.exit(main())
