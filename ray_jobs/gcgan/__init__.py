"""The GCGAN job's parts (DIM): config, driver (one Ray Train run per class), worker,
synthesis of a dataset version, and the quality report. The job is ``ray_jobs.gan``.
"""
