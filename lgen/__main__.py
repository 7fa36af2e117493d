import sys

from lgen.cli import main

sys.exit(main())
