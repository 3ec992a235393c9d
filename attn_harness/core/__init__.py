"""Torch-free core: the data contract, frame geometry, statistics on DataArrays, checks and spec files."""
