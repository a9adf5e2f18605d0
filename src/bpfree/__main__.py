"""``python -m bpfree``: the ``bpfree`` command."""

import sys

from .cli import main

sys.exit(main())
