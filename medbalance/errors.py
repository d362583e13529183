"""Project exceptions.

Every error a user can cause (bad input, bad config, unreachable storage) is raised as a
``MedbalanceError`` whose message says what failed, where (file, row, step) and what to do next.
Jobs catch it at the top, print the message and exit with status 2 (no traceback).
"""


class MedbalanceError(Exception):
    """Base class of errors meant for people: the message is the whole story."""


class DataError(MedbalanceError):
    """Bad input data: an image, a row, a label, a split, a shard or a manifest."""


class StorageError(MedbalanceError):
    """A storage URI that cannot be reached, read or written."""


class ConfigError(MedbalanceError):
    """A configuration value or CLI flag that cannot be used."""


class TrainingError(MedbalanceError):
    """Training cannot go on (e.g. a non-finite loss); the message names epoch and step."""


class ClusterError(MedbalanceError):
    """Ray could not be started or reached (a start-up time-out, a wrong ``RAY_ADDRESS``)."""
