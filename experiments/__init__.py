"""Experiments reproducing published findings about batch normalization."""
