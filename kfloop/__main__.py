"""``python -m kfloop`` runs the command line."""

from kfloop.cli import main

main()
