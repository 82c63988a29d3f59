import sys

from zaki.cli import main

sys.exit(main())
