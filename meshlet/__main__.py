import sys

from meshlet.cli.main import main

sys.exit(main())
