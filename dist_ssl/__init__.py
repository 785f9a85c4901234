"""dist-ssl: semi-supervised image classification with pseudo-labels at cluster scale."""

__version__ = "0.1.0"
