"""Reading cells from where they live: the census, a SOMA experiment or an .h5ad (``sources``), and
the checks and normalisation every reader of counts shares (``counts``)."""
