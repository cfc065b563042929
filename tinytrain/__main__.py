"""`python -m tinytrain ...`: the same as the `tinytrain` command."""

from tinytrain.commands.main import main

main()
