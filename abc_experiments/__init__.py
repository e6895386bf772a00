"""abc-experiments: a Hydra experiment runner for ABC-Net binary CNNs (Lin, Zhao & Pan, NIPS 2017,
arXiv 1711.11294).

``load_run(run_dir)`` reopens a finished run's fine-tuned model; it is imported on first use, so
that light readers of results (``abc-report``) do not import torch.
"""


def __getattr__(name: str):
    if name == "load_run":
        from .runs import load_run

        return load_run
    raise AttributeError(f"module 'abc_experiments' has no attribute {name!r}")


__all__ = ["load_run"]
