"""``recflow demo``: the closed loop end to end (``demo.closed_loop.run_demo``). It sits on top of the
flows it calls, beside the CLI; no other package imports it."""
