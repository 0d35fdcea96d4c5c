"""The learning side of the backend: no HTTP here, only data, training, versions and prediction."""
