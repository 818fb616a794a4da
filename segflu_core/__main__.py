import sys

from segflu_core.cli import main

sys.exit(main())
