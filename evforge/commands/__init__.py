"""The ``evforge`` subcommands, one module per group: each ``add_<command>(sub)`` adds a parser whose ``func``
parses nothing more and calls library functions (imported when the command runs, so ``--help`` stays fast)."""
