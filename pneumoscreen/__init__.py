"""The `pneumoscreen` command line: the one module allowed to import every part."""
