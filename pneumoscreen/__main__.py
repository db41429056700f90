"""`python -m pneumoscreen ...` is `pneumoscreen ...`."""

from pneumoscreen.cli import main

main()
