"""``python -m polartensor``: the main job (see :mod:`polartensor.demo`)."""

import sys

from .demo import main

sys.exit(main())
