import sys

from mmsenti.cli import main

sys.exit(main())
