"""The paper's linear probe on a pretrained checkpoint, with its controls: see --help."""

import sys

from scgraph.eval.cli import probe_main

if __name__ == "__main__":
    sys.exit(probe_main())
