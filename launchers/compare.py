"""The paper's Table II from the MLflow runs of an experiment: see --help."""

import sys

from scgraph.eval.compare import main

if __name__ == "__main__":
    sys.exit(main())
