import sys

from bnexporter.cli import main

sys.exit(main())
