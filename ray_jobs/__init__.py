"""medbalance jobs: each is ``python -m ray_jobs.<job>`` and ``ray job submit``-able."""
