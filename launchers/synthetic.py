"""Entry point of the synthetic relative-position study (paper Table I); see --help."""

from scgraph.synthetic.cli import main

if __name__ == "__main__":
    main()
