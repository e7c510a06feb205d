"""`python -m astrai_train.cli ...` is `astrai ...` (how the demo, the tests and the daemon start
child commands with this interpreter)."""
import sys

from astrai_train.cli import main

sys.exit(main())
