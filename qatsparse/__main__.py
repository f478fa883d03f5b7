"""``python -m qatsparse`` runs the ``qatsparse`` command."""

from qatsparse.cli import main

main()
