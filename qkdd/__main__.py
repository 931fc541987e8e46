import sys

from qkdd.cli import main

sys.exit(main())
