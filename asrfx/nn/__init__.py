"""Modules: the paper's attention modules (``attention``), the gated BatchNorm convert
installs (``gated_norm``), the paper's CIFAR ResNets (``models``)."""
