import sys

from actfleet.cli import main

sys.exit(main())
