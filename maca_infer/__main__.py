import sys

from maca_infer.cli import main

sys.exit(main())
