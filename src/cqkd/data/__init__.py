"""Datasets: the registry (``load_dataset``) and one module per dataset, each registered on import."""

from cqkd.data import cifar, fashion_mnist, folder, synthetic  # noqa: F401  (they register themselves)
