"""The NoneBot process and the ``corefbot`` command line."""
