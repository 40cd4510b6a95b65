"""The one exception type for bad dataset input."""

from __future__ import annotations

from os import PathLike


class DatasetError(Exception):
    """A dataset file or image that cannot be used; ``str()`` is ``"{path}: {problem}"``."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type[DatasetError], tuple[str, str]]:
        # Keep the two-argument constructor working across pickling (multiprocessing).
        return (type(self), (self.path, self.problem))
