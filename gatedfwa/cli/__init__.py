"""Command line: ``gatedfwa train | generate | plot`` (see ``gatedfwa --help``)."""
