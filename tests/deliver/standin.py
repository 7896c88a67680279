#!/usr/bin/python3
"""A stand-in sendmail for the deliverer's tests: records each call, exits as told.

Installed (copied) into a world-traversable directory so a dropped uid can run it.
Each call writes ``calls/<n>.json`` (argv, uid, gid, groups, pid, start time) and
``calls/<n>.in`` (stdin, byte-exact). A recipient ``exitNN@...`` makes it exit NN,
``signalNN@...`` kill itself with signal NN, ``failonce@...`` exit 75 the first
time only, ``talk@...`` print a lot; while the file
``hold`` exists next to it, it waits (after recording) before exiting, and so does
a run for recipient ``LOCAL@...`` while ``hold-LOCAL`` exists.
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CALLS = os.path.join(HERE, "calls")


def main() -> int:
    started = time.time()
    data = sys.stdin.buffer.read()
    name = f"{time.time_ns()}-{os.getpid()}"
    record = {
        "argv": sys.argv[1:],
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
        "pid": os.getpid(),
        "started": started,
    }
    with open(os.path.join(CALLS, name + ".in"), "wb") as fh:
        fh.write(data)
    tmp = os.path.join(CALLS, "." + name)
    with open(tmp, "w") as fh:
        json.dump(record, fh)
    os.rename(tmp, os.path.join(CALLS, name + ".json"))
    code = 0
    for arg in sys.argv[1:]:
        local = arg.split("@")[0]
        if local.startswith("exit"):
            code = int(local[4:])
        elif local.startswith("signal"):
            os.kill(os.getpid(), int(local[6:]))
        elif local == "failonce":
            marker = os.path.join(CALLS, "failed-once")
            if not os.path.exists(marker):
                open(marker, "w").close()
                code = 75
        elif local == "talk":
            sys.stdout.write("x" * 100000 + "\n")
    holds = [os.path.join(HERE, "hold")]
    holds += [os.path.join(HERE, "hold-" + a.split("@")[0]) for a in sys.argv[1:] if "@" in a]
    while any(os.path.exists(h) for h in holds):
        time.sleep(0.05)
    print(f"stand-in: {len(data)} bytes")
    with open(tmp, "w") as fh:  # renamed into place: a reader never sees it half written
        fh.write(repr(time.time()))
    os.rename(tmp, os.path.join(CALLS, name + ".done"))
    return code


if __name__ == "__main__":
    sys.exit(main())
