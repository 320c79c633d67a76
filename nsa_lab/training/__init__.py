"""Lightning training: the module, its callbacks and the run driver."""
