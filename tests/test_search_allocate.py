"""The greedy allocator on synthetic sensitivity curves."""

from collections import OrderedDict

from torch import nn

from netshrink import registry
from netshrink.context import Context
from netshrink.recipe import parse
from netshrink.search import Option, Sensitivity, allocate, to_recipe
from netshrink.search.allocate import hull, layer_options, predicted


def synthetic(sensitive_drop: float = 0.5, quant: bool = True) -> Sensitivity:
    """Two equal layers: 'a' barely cares about pruning, 'b' loses a lot."""
    layers = {n: {"kind": "Linear", "bytes": 4000, "macs": 1000, "params": 1000} for n in "ab"}
    points = []
    for name, scale in (("a", 0.01), ("b", sensitive_drop)):
        for s in (0.5, 0.9):
            bytes_ = int(4000 * (1 - s)) + 125
            drop = scale * s
            points.append(
                {
                    "layer": name,
                    "family": "prune",
                    "value": s,
                    "metric": 0.9 - drop,
                    "error": drop,
                    "bytes": bytes_,
                }
            )
        points += [
            {
                "layer": name,
                "family": "quant",
                "value": 8,
                "metric": 0.9 - scale / 100,
                "error": scale / 100,
                "bytes": 1040,
            }
        ][: int(quant)]
    return Sensitivity("k", 0.9, layers, points)


def test_budget_met_and_the_insensitive_layer_takes_the_cut():
    sens = synthetic(quant=False)
    choice, fits = allocate(sens, budget=4600, resource="bytes")
    cost, _ = predicted(choice)
    assert fits and cost <= 4600
    assert choice["a"].sparsity == 0.9
    assert choice["b"].sparsity is None or choice["b"].sparsity < 0.9


def test_nearly_free_int8_is_taken_before_any_pruning():
    choice, fits = allocate(synthetic(), budget=4600)
    assert fits and all(o.bits == 8 and o.sparsity is None for o in choice.values())


def test_loose_budget_changes_nothing_and_an_impossible_one_is_reported():
    sens = synthetic()
    choice, fits = allocate(sens, budget=8000)
    assert fits and all(o.label() == "keep" for o in choice.values())
    choice, fits = allocate(sens, budget=10)
    assert not fits
    assert predicted(choice)[0] == sum(
        min(o.cost for o in layer_options(sens, n, "bytes")) for n in "ab"
    )


def test_hull_drops_dominated_and_concave_options():
    walk = hull(layer_options(synthetic(), "b", "bytes"))
    costs = [o.cost for o in walk]
    losses = [o.loss for o in walk]
    assert costs == sorted(costs, reverse=True)
    assert losses == sorted(losses)
    slopes = [(losses[i + 1] - losses[i]) / (costs[i] - costs[i + 1]) for i in range(len(walk) - 1)]
    assert slopes == sorted(slopes)


def test_speed_goals_never_buy_pruning_for_macs():
    choice, fits = allocate(synthetic(), budget=1500, resource="macs")
    assert not fits  # only low-rank cuts MACs and these curves have none
    assert all(o.sparsity is None and o.bits is None for o in choice.values())


def test_recipe_from_an_allocation_validates_with_per_layer_targets():
    choice, _ = allocate(synthetic(quant=False), budget=3000)
    recipe = to_recipe(choice, finetune_epochs=1)
    parsed = parse(recipe)
    assert parsed.stages[0].name == "prune.magnitude"
    includes = [set(s.config.targets.include) for s in parsed.stages]
    assert set().union(*includes) <= {"a", "b"}
    assert parsed.stages[0].config.finetune.epochs == 1


def test_a_factorized_layer_is_quantized_through_its_factors():
    choice = {
        "a": Option("a", 100.0, 0.1, ratio=0.25, bits=4),
        "b": Option("b", 100.0, 0.1, bits=4),
    }
    stages = to_recipe(choice)["stages"]
    assert stages[0] == {"lowrank.svd": {"ratio": 0.25, "targets": {"include": ["a"]}}}
    assert stages[1]["quantize.weight_only"]["targets"]["include"] == [r"re:a(\..+)?", "b"]
    parse(to_recipe(choice))


def test_the_factor_pattern_still_quantizes_a_layer_left_unfactorized() -> None:
    """When the low-rank stage is rolled back, the quant stage reaches the layer itself."""
    model = nn.Sequential(OrderedDict(a=nn.Linear(8, 8), ab=nn.Linear(8, 8), b=nn.Linear(8, 8)))
    choice = {
        "a": Option("a", 100.0, 0.1, ratio=0.25, bits=8),
        "b": Option("b", 100.0, 0.1, bits=8),
    }
    ((name, options),) = to_recipe(choice)["stages"][1].items()
    quantized = registry.get(name).apply(
        model, registry.get(name).make_config(options, stage=name), Context()
    )
    kinds = {n: type(m).__name__ for n, m in quantized.named_children()}
    assert kinds["a"] != "Linear" and kinds["b"] != "Linear"
    assert kinds["ab"] == "Linear"  # "a" does not reach a sibling whose name starts with it
