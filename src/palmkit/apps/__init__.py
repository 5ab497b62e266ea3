"""Applications on top of the library: the CLI's commands, the quickstart and the recipes."""
