"""The synthetic relative-position study (the paper's Table I and Figure 3).

generators: the value-generator family and datasets; models: the two one-layer models built from
the census Block and mixers; train: one task (dataset + model + training); report: Table I and
Figure 3; bounds: error floors; study: the grid over a process pool with MLflow, and the command
line (its options are ``scgraph.synthetic.config.StudyConfig``). Nothing is
re-exported here, so a pool worker importing ``train`` does not pay for MLflow and matplotlib.
"""
