import sys

from abcgpt.cli import main

sys.exit(main())
