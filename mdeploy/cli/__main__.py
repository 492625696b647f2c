"""``python -m mdeploy.cli``."""

from mdeploy.cli import main

main()
