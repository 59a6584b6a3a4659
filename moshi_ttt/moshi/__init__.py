"""Moshi integration: the only subpackage that imports `moshi`."""
