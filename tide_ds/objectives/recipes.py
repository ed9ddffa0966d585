"""Recipes are data: weighted lists of terms, plus whether the teacher runs CompDemo's two passes."""
from __future__ import annotations

from dataclasses import dataclass, field

from tide_ds.config import ConfigError
from tide_ds.objectives.terms import TERMS


@dataclass(frozen=True)
class Recipe:
    terms: dict[str, float] = field(default_factory=dict)
    comp_demo: bool = False


# The paper's recipes (TIDE section 6). Pipeline A's native recipe is tide_cross, B's tide_shared.
RECIPES: dict[str, Recipe] = {
    "ce": Recipe({"ce": 1.0}),
    "kl": Recipe({"ce": 1.0, "kl": 1.0}),
    "reverse_kl": Recipe({"ce": 1.0, "reverse_kl": 1.0}),
    "calm": Recipe({"ce": 1.0, "calm": 1.0}),
    "tide_cross": Recipe({"ce": 1.0, "reverse_calm": 1.0}),
    "tide_shared": Recipe({"ce": 1.0, "tidal": 1.0}, comp_demo=True),
}


def resolve_terms(recipe: str, terms: dict[str, float] | None = None) -> Recipe:
    """The recipe by name, with its terms replaced by an explicit {term: weight} when given."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe '{recipe}'; choose one of {', '.join(RECIPES)} (config key 'recipe')")
    base = RECIPES[recipe]
    if terms is None:
        return base
    for name, weight in terms.items():
        if name not in TERMS:
            raise ConfigError(f"unknown loss term '{name}' in config key 'terms'; choose from {', '.join(TERMS)}")
        if weight < 0:
            raise ConfigError(f"terms.{name} has negative weight {weight}; weights must be >= 0")
    if not any(weight > 0 for weight in terms.values()):
        raise ConfigError(f"config key 'terms' gives no term a positive weight ({terms}); the loss would be empty")
    return Recipe(dict(terms), comp_demo=base.comp_demo)


def needs_teacher(recipe: Recipe) -> bool:
    return any(name != "ce" and w > 0 for name, w in recipe.terms.items())
