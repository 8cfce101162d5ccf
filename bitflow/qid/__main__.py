import sys

from bitflow.qid import main

sys.exit(main())
