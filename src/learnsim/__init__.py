"""learnsim: variational Bayesian similarity learning for atlas-based diffeomorphic registration of 3D brain MRI."""

__version__ = "0.1.0"
