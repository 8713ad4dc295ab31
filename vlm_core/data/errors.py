"""The one error type of the data path: bad input data (files, records, images), as opposed to bad code."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used. The message names the file, the record or position, and the fix.

    Subclasses ValueError so callers that treat any bad value alike need not import this module.
    """
