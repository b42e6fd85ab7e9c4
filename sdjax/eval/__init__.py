"""Evaluators. `sdjax.eval.shapes`: prompt adherence (colour, shape, position) for the shapes demo."""
