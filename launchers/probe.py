"""The paper's linear probe on a pretrained checkpoint, with its controls: see --help."""

import sys

from scgraph.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
