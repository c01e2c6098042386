import sys

from fmbseg.cli import main

sys.exit(main())
