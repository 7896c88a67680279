"""Logging for the deliverer: syslog (mail facility, like FWTK smapd) and stderr.

Purpose: one ``logging`` logger, ``smapd``. syslog goes through ``/dev/log`` when that
socket exists; where it does not (containers, CI) the deliverer says so once on
stderr and keeps going, because a missing syslog must never stop mail.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

LOGGER = "smapd"
DEV_LOG = "/dev/log"


def setup(debug: bool = False, dev_log: str = DEV_LOG) -> logging.Logger:
    # One line per delivered message: skip what our formats never show (the logging
    # HOWTO's "Optimization": caller file/line lookup, thread and multiprocessing
    # names). This process is the deliverer alone, so the settings are ours to make.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    log = logging.getLogger(LOGGER)
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(logging.Formatter("smapd[%(process)d]: %(levelname)s: %(message)s"))
    log.addHandler(err)
    if os.path.exists(dev_log):
        try:
            sys_handler = logging.handlers.SysLogHandler(
                address=dev_log, facility=logging.handlers.SysLogHandler.LOG_MAIL
            )
        except OSError as exc:
            log.warning("syslog unavailable (%s): logging to stderr only", exc)
        else:
            sys_handler.setFormatter(logging.Formatter("smapd[%(process)d]: %(message)s"))
            log.addHandler(sys_handler)
    else:
        log.debug("no %s: logging to stderr only", dev_log)
    return log
