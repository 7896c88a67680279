"""``smapd``'s entry point: hold SIGHUP/SIGTERM/SIGINT from the first moment.

Importing the command line (click, SQLAlchemy) takes a good part of a second; a
``systemctl reload`` (SIGHUP, whose default action is to terminate) in that window
would kill a starting smapd. Blocked here, before those imports, such a signal stays
pending until the deliverer's loop has its handlers in place and unblocks it
(``smapq.deliver.deliverer``), as ``smapq.deliver.service.run`` does for ``smapq
deliver``.
"""

from __future__ import annotations

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGHUP, signal.SIGTERM, signal.SIGINT))


def main() -> None:
    from .main import smapd_main  # noqa: PLC0415  (after the signals are held)

    smapd_main()
