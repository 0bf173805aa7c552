"""The synthetic shapes world and what is built on it: the renderer (world.py), the data set (data.py),
the pixel-statistics judge (judge.py), the demo model's recipe (recipe.py), ``mav eval`` (evaluate.py,
figures.py) and their commands (commands.py)."""

from workflows.shapes.commands import add_parsers

__all__ = ["add_parsers"]
