"""The classifier: its config, Ray Data pipeline, optimiser, training worker and driver,
inference, evaluation and prediction. Used by the train, evaluate, predict and demo jobs and
by the sweeps' trials.
"""
