"""``python -m dataloader.synthetic OUT_DIR --preset ...``: see `dataloader.synthetic.generator.main`."""

import sys

from dataloader.synthetic.generator import main

# Guarded: worker processes are spawned and import this module again as '__mp_main__'.
if __name__ == "__main__":
    sys.exit(main())
