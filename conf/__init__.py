"""abc-run's Hydra configs, shipped inside the package as ``abc_experiments.conf``."""
