import sys

from numavm.cli import main

sys.exit(main())
