"""Run a program under ``smapq.sandbox.confine``: ``confined.py [--hide-proc] PROGRAM ARGS...``.

The filter and no_new_privs survive execve, so the program runs exactly as it would
once the receiver confines itself (the pid, which the filter's self-signal rule names,
does not change across execve either).
"""

import os
import sys

from smapq import sandbox

args = sys.argv[1:]
hide = args[0] == "--hide-proc"
if hide:
    args.pop(0)
sandbox.confine(hide=hide)
os.execv(args[0], args)
