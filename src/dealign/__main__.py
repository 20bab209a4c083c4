"""``python -m dealign`` runs the same command line as the ``dealign`` script."""

from .cli.main import app

if __name__ == "__main__":
    app(prog_name="dealign")
