"""The ``swudi`` command line (:mod:`swudi.cli.app`)."""

from swudi.cli.app import app

__all__ = ["app"]
