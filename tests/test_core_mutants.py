"""Tests of model.py and generate.py written to kill mutants that the module tests let
survive (`mutmut run`, README's maintainers' section): each names the behaviour it pins.
Layer-level ones are in test_layers.py.
"""

import pytest

from functional_gpt import UserError, config_of


@pytest.mark.parametrize("params", [{}, {"wte": {"weight": None}}, {"wte": {}, "wpe": {}, "h": []}])
def test_config_of_params_without_the_needed_shapes_says_what_is_needed(params):
    with pytest.raises(UserError, match=r"^params: cannot read the config off the shapes \(wte\.weight, "
                                        r"wpe\.weight and h are needed\); pass the config$"):
        config_of(params)
