import sys

from mailgate.commands.cli import main

sys.exit(main())
