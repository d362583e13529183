"""What every job runs on: the Ray session (``ray_setup``), the command line (``cli``),
progress lines, run folders and checkpoints, CPU/GPU planning (``resources``), collectives, AMP,
seeding, config loading and checks, and the messages for damaged data. Imports nothing else of ``ray_jobs``.
"""
