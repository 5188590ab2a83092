from specserve.server.engine import Engine
from specserve.server.engine.calibration import CANDIDATES, calibrate_tree_nodes
from specserve.server.engine.config import EngineConfig


def test_calibration_measures_every_size_and_picks_one_within_budget(tiny_model_dir):
    engine = Engine.from_config(EngineConfig(str(tiny_model_dir)))
    nodes, ratios = calibrate_tree_nodes(engine.target, prefix_len=32, repeats=2)
    assert set(ratios) == set(CANDIDATES)
    assert all(r > 0 for r in ratios.values())
    assert nodes in CANDIDATES
    assert ratios[nodes] <= 1.3 or nodes == CANDIDATES[0]
    # an impossible budget falls back to the smallest size; a huge one allows the largest
    assert calibrate_tree_nodes(engine.target, max_cost_ratio=0.0, prefix_len=32, repeats=1)[0] == CANDIDATES[0]
    assert calibrate_tree_nodes(engine.target, max_cost_ratio=1e9, prefix_len=32, repeats=1)[0] == CANDIDATES[-1]


def test_cli_auto_nodes_sets_calibration():
    from specserve.server.cli import build_parser, engine_config

    args = build_parser().parse_args(["generate", "--tree-nodes", "auto", "hi"])
    assert engine_config(args).calibrate_tree
    args = build_parser().parse_args(["generate", "--tree-nodes", "24", "hi"])
    config = engine_config(args)
    assert not config.calibrate_tree and config.tree.draft_nodes == 24


def test_cli_tree_branching_keeps_the_old_flag_name():
    from specserve.server.cli import build_parser, engine_config

    for flag in ("--tree-branching", "--tree-top-k"):
        args = build_parser().parse_args(["generate", flag, "3", "--tree-mode", "static", "hi"])
        tree = engine_config(args).tree
        assert (tree.branching, tree.mode.value) == (3, "static")
