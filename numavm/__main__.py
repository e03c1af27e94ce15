from numavm.command import become_command

become_command()  # before anything else is imported: a signal at start-up ends numavm as README says

import sys  # noqa: E402

from numavm.cli import main  # noqa: E402

sys.exit(main())
