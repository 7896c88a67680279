"""smapq deliver (smapd): claim queued messages, run sendmail, record the outcome.

The only code in smapq that executes the delivery program. See ``docs/delivery.md``.
"""
