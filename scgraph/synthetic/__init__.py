"""The synthetic relative-position study (paper section III-B, Table I, Figure 3; SPEC §2).

generators: the value-generator family and datasets; models: the two one-layer models built from
the census Block and mixers; train: one task (dataset + model + training); report: Table I and
Figure 3; study: the grid over a process pool with MLflow; cli: the command line. Nothing is
re-exported here, so a pool worker importing ``train`` does not pay for MLflow and matplotlib.
"""
