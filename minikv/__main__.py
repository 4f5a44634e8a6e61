import sys

from minikv.cli.main import main

sys.exit(main())
