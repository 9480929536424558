"""Command-line conventions shared by train, prepare, denoise and evaluate.

File options take several files after one flag and may also be repeated (`--clean a b` and
`--clean a --clean b` both give [a, b]): argparse's plain nargs="+" silently kept only the last
flag's files. Hyperparameters are checked before any work, and a bad value is refused with one
line naming the option (exit status 2, as for any bad input).
"""
import math

from .mrcstack import DataError


def add_files(group, *flags, **kwargs):
    """A file option that accepts several files per flag and repeated flags, in order."""
    kwargs.setdefault("metavar", "FILE")
    kwargs.setdefault("default", [])
    return group.add_argument(*flags, action="extend", nargs="+", **kwargs)


def finite(value):
    return value is not None and math.isfinite(value)


def refuse(problems):
    """Raise DataError with the message of the first (bad, message) pair that is bad."""
    for bad, message in problems:
        if bad:
            raise DataError(message)
