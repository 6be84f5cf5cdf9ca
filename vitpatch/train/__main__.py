"""``python -m vitpatch.train ARGS`` runs ``vitpatch train ARGS`` (the form ``torchrun -m`` takes)."""
import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
