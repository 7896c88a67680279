"""``python -m smapq.receive``: the same as the ``smap`` console script."""

from smapq.receive.main import main

main()
