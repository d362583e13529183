"""Ray Tune over classifier runs: the search space, the trials, the sweep (Optuna + ASHA), the
method comparison and their reports. The jobs are ``ray_jobs.sweep`` and ``ray_jobs.compare``.
"""
