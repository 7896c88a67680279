"""Reports, queue verbs, FWTK spool import and Prometheus metrics over the queue database.

Purpose: the operator's side of smapq. ``reports`` and ``metrics`` only read (through a
read-only engine); ``queue`` and ``importspool`` change rows, each change one
transaction that also appends its event to the envelope log.

Security: run by the administrator outside the jail. Nothing here runs sendmail or
touches the receiver's path; all SQL lives in ``smapq.store.queries``.
"""
