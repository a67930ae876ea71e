import sys

from exatrain.cli import main

sys.exit(main())
