"""The smoke recipe's bundle, trained once for the recipe's and ``mav eval``'s tests."""

import pytest

from workflows.shapes import recipe

HELD = ("red triangle", "blue circle", "yellow square")  # the smoke recipe's held-out pairs


def smoke_recipe() -> recipe.RecipeConfig:
    """The shipped smoke recipe (cluster/recipes/shapes-smoke.yaml: the shapes preset, every step of the full
    recipe on a handful of items and steps)."""
    return recipe.load_recipe(recipe.recipe_path("shapes", "smoke"))


@pytest.fixture(scope="session")
def bundle(ray_session, tmp_path_factory):
    """``mav recipe shapes --size smoke`` on the session's Ray instance: (the bundle's path, recipe state)."""
    out = str(tmp_path_factory.mktemp("recipe") / "shapes")
    state = recipe.run_recipe(smoke_recipe(), out, log=lambda text: None)
    return out, state
