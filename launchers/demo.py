"""`make demo`: the whole pipeline on real CBMC cells, offline, in one command; see --help."""

import sys

from scgraph.demo import main

if __name__ == "__main__":
    sys.exit(main())
