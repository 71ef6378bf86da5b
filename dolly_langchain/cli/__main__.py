import sys

from dolly_langchain.cli import main

sys.exit(main())
