"""``smapq serve``: the long-lived listener transport of the intake."""
