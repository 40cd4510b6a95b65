"""The error of a caption-dir run as a whole (a single file's failure is an error record instead)."""

from __future__ import annotations


class BulkError(Exception):
    """The run cannot go on (bad options or output file, unreachable service, a request the service
    refuses). Raised during a run, it stops it early: what was written stays, and the same command
    resumes."""
