from megatrain.cli import entry

entry()
