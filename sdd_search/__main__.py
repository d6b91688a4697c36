import sys

from sdd_search.cli import main

sys.exit(main())
