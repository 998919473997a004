import sys

from convflat.cli import main

sys.exit(main())
