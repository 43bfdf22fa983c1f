"""The applications on top of training and evaluation: the run report and the ablation."""
