"""Hydra experiment runner for ABC-Net binary CNNs (Lin, Zhao & Pan, arXiv 1711.11294)."""
