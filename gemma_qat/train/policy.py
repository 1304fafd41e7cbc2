"""From `quant.recipe` (a string in the run config) to the student's QuantPolicy.

A name is looked up in a small registry first (tests and experiments register their own policies,
or pass one to `train(..., quant_policy=...)`), otherwise it is a recipe preset (q4_0, mobile, ...).
"""

from __future__ import annotations

import functools
from typing import Callable

from gemma_qat.model.config import ModelConfig
from gemma_qat.model.layers import NoQuant, QuantPolicy
from gemma_qat.quant.policy import RecipePolicy
from gemma_qat.quant.recipe import PRESETS, resolve_recipe

PolicyFactory = Callable[[ModelConfig], QuantPolicy]

# One shared NoQuant: a policy is part of the jitted model's identity, so reusing the instance lets
# repeated runs in one process share compiled steps.
_NO_QUANT = NoQuant()
_REGISTRY: dict[str, PolicyFactory] = {"none": lambda config: _NO_QUANT}


def register_policy(name: str, factory: PolicyFactory) -> None:
    """Makes `quant.recipe = name` resolve to `factory(model_config)`."""
    _REGISTRY[name] = factory


def known_names() -> list[str]:
    """Every `quant.recipe` that resolves (registered names, then presets): the config checks
    against this when it loads, before any data or model is touched."""
    return [*_REGISTRY, *PRESETS]


def is_known(name: str) -> bool:
    return name in _REGISTRY or name.lower() in PRESETS  # presets in any case, as get_recipe


@functools.lru_cache(maxsize=16)
def recipe_policy(name: str, config: ModelConfig, q4_0_impl: str = "auto", backend: str = "auto") -> RecipePolicy:
    """A preset recipe resolved for `config` (cached: the same policy object keeps compiled steps).
    backend: "auto", "formats" or "aqt" (quant/policy.py BACKENDS), the fake-quant's implementation."""
    return RecipePolicy(resolve_recipe(name, config), q4_0_impl=q4_0_impl, backend=backend)


def resolve_policy(name: str, config: ModelConfig, q4_0_impl: str = "auto", backend: str = "auto") -> QuantPolicy:
    if name in _REGISTRY:
        return _REGISTRY[name](config)
    return recipe_policy(name, config, q4_0_impl, backend)
