"""The synthetic relative-position study (paper Table I): see --help."""

import sys

from scgraph.synthetic.study import main

if __name__ == "__main__":
    sys.exit(main())
