import sys

from fedmask.cli import main

sys.exit(main())
