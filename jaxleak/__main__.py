import sys

from jaxleak.cli import main

sys.exit(main())
