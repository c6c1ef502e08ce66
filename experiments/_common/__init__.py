"""Shared pieces of the experiments: data, models, the vmapped train loop, results."""
