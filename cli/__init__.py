"""The click front end (installed as ``smapq_cli``): options in, engine calls, one-line errors."""
