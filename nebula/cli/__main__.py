"""`python -m nebula.cli`: the same as `nebula-cli`."""

import sys

from nebula.cli.main import main

sys.exit(main())
