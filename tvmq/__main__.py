import os
import sys

from tvmq.cli import EXIT_INTERRUPTED, main

code = main()
if code == EXIT_INTERRUPTED:
    # CPython 3.11 marks a KeyboardInterrupt as "unhandled" when it passes through any exec() of a
    # string (dataclasses builds methods that way during imports), even if it is caught later, and then
    # kills the process with SIGINT at exit instead of returning 130. Cleanup has already run here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
