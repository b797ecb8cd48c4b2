"""``python -m swudi.cli``."""

from swudi.cli.app import main

main()
