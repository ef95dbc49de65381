"""Tests of bsattn.deepspeed.sparsity_config (NumPy only): DeepSpeed's layouts drawn by hand (the spec's golden grids and
ours where we differ on purpose), token masks, seeded random blocks, validation errors, the JSON factory,
serialisation and the value semantics that keep one config's tables from another."""

import json
import textwrap

import numpy as np
import pytest

from bsattn.fused_tables import fused_tables_for_pattern
from bsattn.deepspeed.sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
    deserialize_sparsity_config,
    serialize_sparsity_config,
    sparsity_config_from_json,
)


def grid(text: str) -> str:
    return textwrap.dedent(text).strip()


def drawn(layout: np.ndarray) -> str:
    return "\n".join("".join("#" if x else "." for x in row) for row in layout)


UNI = {"attention": "unidirectional"}

# (config with block=1, number of blocks, expected head-0 layout). The first ones are the spec's golden grids
# (DeepSpeed's upstream code run on them); the "ours" ones are where we deliberately differ.
GOLDEN = {
    "fixed_bi": (FixedSparsityConfig(1, block=1), 8, """
        ####...#
        ####...#
        ####...#
        ####...#
        ...#####
        ...#####
        ...#####
        ...#####"""),
    "fixed_uni": (FixedSparsityConfig(1, block=1, **UNI), 8, """
        #.......
        ##......
        ###.....
        ####....
        ...##...
        ...###..
        ...####.
        ...#####"""),
    "fixed_bi_horizontal_short_window": (FixedSparsityConfig(1, block=1, horizontal_global_attention=True), 10, """
        ####...#.#
        ####...#.#
        ####...#.#
        ##########
        ...#####.#
        ...#####.#
        ...#####.#
        ##########
        ...#...###
        ##########"""),
    "fixed_uni_short_window": (FixedSparsityConfig(1, block=1, **UNI), 10, """
        #.........
        ##........
        ###.......
        ####......
        ...##.....
        ...###....
        ...####...
        ...#####..
        ...#...##.
        ...#...###"""),
    # ours: DeepSpeed also sets row 2 / column 3 and row 6 / column 7 (above the diagonal).
    "fixed_uni_two_globals_ours": (FixedSparsityConfig(1, block=1, num_global_blocks=2, **UNI), 8, """
        #.......
        ##......
        ###.....
        ####....
        ..###...
        ..####..
        ..#####.
        ..######"""),
    "variable_bi_defaults": (VariableSparsityConfig(1, block=1), 8, """
        ####....
        ####....
        ####....
        ####....
        #...####
        #...####
        #...####
        #...####"""),
    "variable_uni_windows_123": (VariableSparsityConfig(1, block=1, local_window_blocks=[1, 2, 3], **UNI), 10, """
        #.........
        ##........
        ###.......
        #..#......
        #..##.....
        #..###....
        #.....#...
        #.....##..
        #.....###.
        #........#"""),
    "variable_bi_global_range_horizontal": (
        VariableSparsityConfig(1, block=1, local_window_blocks=[2], global_block_indices=[1],
                               global_block_end_indices=[3], horizontal_global_attention=True), 8, """
        ###.....
        ########
        ########
        .###....
        .##.##..
        .##.##..
        .##...##
        .##...##"""),
    # ours: DeepSpeed's column 2 starts at row 1 (the range's start).
    "variable_uni_global_range_ours": (
        VariableSparsityConfig(1, block=1, local_window_blocks=[4], global_block_indices=[1],
                               global_block_end_indices=[3], **UNI), 6, """
        #.....
        ##....
        ###...
        ####..
        .##.#.
        .##.##"""),
    "bigbird_bi_no_random": (BigBirdSparsityConfig(1, block=1, num_random_blocks=0), 8, """
        ########
        ###.....
        ####....
        #.###...
        #..###..
        #...###.
        #....###
        #.....##"""),
    "bigbird_uni_no_random": (BigBirdSparsityConfig(1, block=1, num_random_blocks=0, **UNI), 8, """
        #.......
        ##......
        ###.....
        #.##....
        #..##...
        #...##..
        #....##.
        #.....##"""),
    "bslongformer_bi_defaults": (BSLongformerSparsityConfig(1, block=1), 8, """
        ########
        ###.....
        ####....
        #.###...
        #..###..
        #...###.
        #....###
        #.....##"""),
    "bslongformer_uni_w5_g05": (
        BSLongformerSparsityConfig(1, block=1, num_sliding_window_blocks=5, global_block_indices=[0, 5], **UNI), 8, """
        #.......
        ##......
        ###.....
        ####....
        #.###...
        ######..
        #...###.
        #....###"""),
    "bslongformer_bi_range_2_4": (
        BSLongformerSparsityConfig(1, block=1, global_block_indices=[2], global_block_end_indices=[4]), 8, """
        ####....
        ####....
        ########
        ########
        ..####..
        ..#####.
        ..##.###
        ..##..##"""),
    "local_default_uni": (LocalSlidingWindowSparsityConfig(1, block=1), 8, """
        #.......
        ##......
        .##.....
        ..##....
        ...##...
        ....##..
        .....##.
        ......##"""),
    "local_w4_bi": (LocalSlidingWindowSparsityConfig(1, block=1, num_sliding_window_blocks=4,
                                                     attention="bidirectional"), 8, """
        ###.....
        ####....
        #####...
        .#####..
        ..#####.
        ...#####
        ....####
        .....###"""),
    "local_w4_uni": (LocalSlidingWindowSparsityConfig(1, block=1, num_sliding_window_blocks=4), 8, """
        #.......
        ##......
        ###.....
        .###....
        ..###...
        ...###..
        ....###.
        .....###"""),
    "dense": (DenseSparsityConfig(1, block=1), 3, """
        ###
        ###
        ###"""),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_layouts(case):
    config, nb, expected = GOLDEN[case]
    layout = config.make_layout(nb * config.block)
    assert layout.dtype == np.int64 and layout.shape == (config.num_heads, nb, nb)
    assert drawn(layout[0]) == grid(expected)


def test_fixed_global_patterns_rotate_per_head():
    config = FixedSparsityConfig(4, block=1, different_layout_per_head=True, num_different_global_patterns=4)
    layout = config.make_layout(8)
    for h, cols in enumerate([(3, 7), (2, 6), (1, 5), (0, 4)]):
        # Row 0 (window 0) sees its local window plus the other window's global column.
        assert layout[h, 0].nonzero()[0].tolist() == [0, 1, 2, 3, cols[1]]
        assert layout[h, :, cols[0]].all() and layout[h, :, cols[1]].all()
    assert config.num_layouts == 4


# ---- patterns: token masks, block classes, the actual length -----------------------------------------------

PATTERN_CASES = {
    "fixed_uni": FixedSparsityConfig(2, block=4, num_local_blocks=2, **UNI),
    "fixed_bi_per_head": FixedSparsityConfig(2, block=4, different_layout_per_head=True, num_local_blocks=4,
                                             num_global_blocks=2, num_different_global_patterns=2),
    "variable_uni_random": VariableSparsityConfig(2, block=4, num_random_blocks=2, local_window_blocks=[2, 3], **UNI),
    "bigbird_bi_per_head": BigBirdSparsityConfig(2, block=4, different_layout_per_head=True, num_random_blocks=2),
    "bslongformer_uni": BSLongformerSparsityConfig(2, block=4, global_block_indices=[1, 5], **UNI),
    "local_uni": LocalSlidingWindowSparsityConfig(2, block=4, num_sliding_window_blocks=5),
    "dense": DenseSparsityConfig(2, block=4),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PATTERN_CASES))
def test_token_mask_is_layout_plus_causality(case):
    config = PATTERN_CASES[case]
    n, bs = 40, config.block
    layout = config.make_layout(n)[: config.num_layouts] != 0
    expected = np.kron(layout, np.ones((1, bs, bs), dtype=bool)) != 0
    if config.unidirectional:
        expected &= np.tril(np.ones((n, n), dtype=bool))
        assert not np.triu(layout, 1).any(), "unidirectional layouts are lower triangular"
    np.testing.assert_array_equal(config.token_mask(n), expected)
    active, full = config.block_classes(n, n, bs)
    np.testing.assert_array_equal(active, layout)  # the layout of the actual length
    # Full / partial blocks agree with the token mask; at another op block size too (derived token by token).
    for block_size in (bs, 8):
        active, full = config.block_classes(n if block_size == bs else 48, n if block_size == bs else 48, block_size)
        tokens = config.token_mask(n if block_size == bs else 48)
        nb = tokens.shape[-1] // block_size
        blocks = tokens.reshape(-1, nb, block_size, nb, block_size)
        np.testing.assert_array_equal(active, blocks.any(axis=(2, 4)))
        np.testing.assert_array_equal(full, blocks.all(axis=(2, 4)))


def test_unidirectional_is_causal_inside_diagonal_blocks():
    config = FixedSparsityConfig(1, block=4, num_local_blocks=2, **UNI)
    assert config.layout_ascii(16, block_size=4) == grid("""
        +...
        #+..
        .#+.
        .##+""")  # global columns 1 and 3; diagonal blocks keep their lower triangle
    assert config.token_ascii(8) == grid("""
        #.......
        ##......
        ###.....
        ####....
        #####...
        ######..
        #######.
        ########""")


def test_layout_is_built_for_the_actual_length_not_sliced():
    config = FixedSparsityConfig(1, block=1)
    short = config.make_layout(6)[0]
    sliced = config.make_layout(8)[0, :6, :6]
    # The short last window [4, 6) has its own global column 5; a slice of the 8-block layout has none.
    assert short[:, 5].all() and not sliced[:, 5].all()
    np.testing.assert_array_equal(config.block_layout(6, 6, 1)[0], short != 0)


# ---- random blocks -----------------------------------------------------------------------------------------


def test_random_blocks_are_seeded_and_causal():
    uni = BigBirdSparsityConfig(1, block=1, num_random_blocks=3, num_global_blocks=0, num_sliding_window_blocks=1,
                                **UNI)  # fmt: skip
    layout = uni.make_layout(16)[0]  # DeepSpeed crashed here (random.sample larger than the population)
    assert not np.triu(layout, 1).any()
    # Diagonal (the window) + min(3, row + 1) distinct random causal blocks, the diagonal possibly among them.
    counts = layout.sum(axis=1)
    assert all(min(3, r + 1) <= counts[r] <= min(4, r + 1) for r in range(16))
    np.testing.assert_array_equal(layout, uni.make_layout(16)[0])
    other = BigBirdSparsityConfig(1, block=1, num_random_blocks=3, num_global_blocks=0, num_sliding_window_blocks=1,
                                  seed=1, **UNI)  # fmt: skip
    assert not np.array_equal(layout, other.make_layout(16)[0])
    assert uni != other and hash(uni) != hash(other)

    var = VariableSparsityConfig(1, block=1, num_random_blocks=2, local_window_blocks=[1], global_block_indices=[],
                                 **UNI)  # fmt: skip
    assert not np.triu(var.make_layout(12)[0], 1).any()  # DeepSpeed drew future blocks here


def test_random_blocks_per_head():
    shared = BigBirdSparsityConfig(4, block=1, num_random_blocks=2)
    layout = shared.make_layout(32)
    assert all(np.array_equal(layout[0], layout[h]) for h in range(4)) and shared.num_layouts == 1
    per_head = BigBirdSparsityConfig(4, block=1, num_random_blocks=2, different_layout_per_head=True)
    layout = per_head.make_layout(32)
    assert per_head.num_layouts == 4 and not np.array_equal(layout[0], layout[1])
    assert (layout.sum(axis=2) >= 3).all()  # window rows have >= 2 blocks, plus random ones


# ---- validation --------------------------------------------------------------------------------------------

ERRORS = {
    "fixed_local_not_multiple": (lambda: FixedSparsityConfig(2, num_local_blocks=4, num_global_blocks=3),
                                 ValueError, "must be dividable by number of global blocks, 3"),
    "fixed_attention": (lambda: FixedSparsityConfig(2, attention="causal"), NotImplementedError, "uni/bi-directional"),
    "fixed_horizontal_uni": (lambda: FixedSparsityConfig(2, horizontal_global_attention=True, **UNI), ValueError,
                             "only \"bi-directional\" attentions can support horizontal"),
    "fixed_patterns_single_layout": (lambda: FixedSparsityConfig(2, num_different_global_patterns=2), ValueError,
                                     "Set different_layout_per_head to True"),
    "fixed_too_many_patterns": (lambda: FixedSparsityConfig(2, different_layout_per_head=True,
                                                            num_different_global_patterns=5), ValueError,
                                "num_different_global_patterns"),
    "fixed_zero_globals": (lambda: FixedSparsityConfig(2, num_global_blocks=0), ValueError, "num_global_blocks"),
    "num_heads": (lambda: DenseSparsityConfig(0), ValueError, "num_heads must be a positive integer"),
    "block": (lambda: DenseSparsityConfig(2, block=2.0), ValueError, "block must be a positive integer"),
    "variable_lengths": (lambda: VariableSparsityConfig(2, global_block_indices=[0, 4], global_block_end_indices=[2]),
                         ValueError, "start indices length, 2, must be same as global block end indices length, 1"),
    "variable_start_end": (lambda: VariableSparsityConfig(2, global_block_indices=[3], global_block_end_indices=[3]),
                           ValueError, "Global block start index, 3, must be smaller than global block end index, 3"),
    "variable_attention": (lambda: VariableSparsityConfig(2, attention="x"), NotImplementedError, "uni/bi"),
    "variable_horizontal_uni": (lambda: VariableSparsityConfig(2, horizontal_global_attention=True, **UNI),
                                ValueError, "horizontal"),
    "variable_window": (lambda: VariableSparsityConfig(2, local_window_blocks=[]), ValueError, "local_window_blocks"),
    "variable_random_count": (lambda: VariableSparsityConfig(2, block=1, num_random_blocks=5).make_layout(4),
                              ValueError, "Number of random blocks, 5, must be smaller than overall number of blocks"),
    "bigbird_attention": (lambda: BigBirdSparsityConfig(2, attention="x"), NotImplementedError, "uni/bi"),
    "bigbird_window": (lambda: BigBirdSparsityConfig(2, block=1, num_sliding_window_blocks=5).make_layout(4),
                       ValueError, "sliding window blocks, 5"),
    "bigbird_globals": (lambda: BigBirdSparsityConfig(2, block=1, num_random_blocks=0, num_global_blocks=5)
                        .make_layout(4), ValueError, "global blocks, 5"),
    "bslongformer_attention": (lambda: BSLongformerSparsityConfig(2, attention="x"), NotImplementedError, "uni/bi"),
    "bslongformer_window": (lambda: BSLongformerSparsityConfig(2, block=1, num_sliding_window_blocks=9)
                            .make_layout(4), ValueError, "sliding window blocks, 9"),
    "local_attention": (lambda: LocalSlidingWindowSparsityConfig(2, attention="x"), NotImplementedError, "uni/bi"),
    "seq_len_divisible": (lambda: DenseSparsityConfig(2, block=16).make_layout(40), ValueError,
                          "Sequence Length, 40, needs to be dividable by Block size 16!"),
    "pattern_n_k_divisible": (lambda: DenseSparsityConfig(2, block=4).token_mask(8, 10), ValueError,
                              "Sequence Length, 10 (n_k), needs to be dividable by Block size 4!"),
    "abstract_base": (lambda: SparsityConfig(2).make_layout(32), NotImplementedError, "implement make_layout"),
    "seed": (lambda: BigBirdSparsityConfig(2, seed=-1), ValueError, "seed must be an integer >= 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_validation_errors(case):
    make, error, message = ERRORS[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


# ---- subclassing, value semantics, serialisation -----------------------------------------------------------


class EveryOtherBlock(SparsityConfig):
    """A user pattern in DeepSpeed's style: stores its argument, implements make_layout."""

    def __init__(self, num_heads, block=16, stride=2):
        super().__init__(num_heads, block)
        self.stride = stride

    def make_layout(self, seq_len):
        layout = self.setup_layout(seq_len)
        layout[:, :, :: self.stride] = 1
        return self.check_and_propagate_first_head_layout(layout)


def test_user_subclass_is_a_pattern():
    config = EveryOtherBlock(2, block=8, stride=3)
    assert config.layout_ascii(32, block_size=8) == grid("#..#\n#..#\n#..#\n#..#")
    tables = fused_tables_for_pattern(config, 32, 32, 8)
    np.testing.assert_array_equal(tables.token_mask()[0], config.token_mask(32)[0])
    assert config.get_config() == {"num_heads": 2, "block": 8, "stride": 3}
    assert deserialize_sparsity_config(serialize_sparsity_config(config)) == config


def test_equal_configs_share_tables_and_different_ones_never_do():
    a, b = FixedSparsityConfig(2, block=8), FixedSparsityConfig(2, block=8)
    c = FixedSparsityConfig(2, block=8, num_local_blocks=2)
    assert a == b and hash(a) == hash(b) and a != c
    assert fused_tables_for_pattern(a, 64, 64, 8) is fused_tables_for_pattern(b, 64, 64, 8)
    assert not np.array_equal(fused_tables_for_pattern(c, 64, 64, 8).layout, fused_tables_for_pattern(a, 64, 64, 8).layout)
    assert BSLongformerSparsityConfig(2, block=8) != BigBirdSparsityConfig(2, block=8, num_random_blocks=0)


@pytest.mark.parametrize("case", list(PATTERN_CASES))
def test_serialisation_round_trip(case):
    config = PATTERN_CASES[case]
    data = json.loads(json.dumps(serialize_sparsity_config(config)))
    assert deserialize_sparsity_config(data) == config


# ---- the JSON factory --------------------------------------------------------------------------------------


def test_json_modes_and_defaults(tmp_path):
    assert sparsity_config_from_json({"mode": "dense"}, 4) == DenseSparsityConfig(4)
    assert sparsity_config_from_json({}, 4) == FixedSparsityConfig(4)  # mode defaults to fixed
    fixed = {"mode": "fixed", "block": 32, "num_local_blocks": 8, "num_global_blocks": 2, "attention": "unidirectional",
             "different_layout_per_head": True, "num_different_global_patterns": 2, "num_sliding_window_blocks": 7}
    assert sparsity_config_from_json(fixed, 4) == FixedSparsityConfig(
        4, 32, True, num_local_blocks=8, num_global_blocks=2, attention="unidirectional",
        num_different_global_patterns=2)  # fmt: skip
    # bigbird from JSON: DeepSpeed's JSON default num_random_blocks is 0 (the class default is 1)
    assert sparsity_config_from_json({"mode": "bigbird"}, 4) == BigBirdSparsityConfig(4, num_random_blocks=0)
    variable = {"mode": "variable", "local_window_blocks": [2, 4], "global_block_indices": [0, 8],
                "global_block_end_indices": [1, 10], "num_random_blocks": 1, "seed": 5}
    assert sparsity_config_from_json(variable, 2) == VariableSparsityConfig(
        2, num_random_blocks=1, local_window_blocks=[2, 4], global_block_indices=[0, 8],
        global_block_end_indices=[1, 10], seed=5)  # fmt: skip
    longformer = {"mode": "bslongformer", "num_sliding_window_blocks": 5, "attention": "unidirectional"}
    assert sparsity_config_from_json(longformer, 2) == BSLongformerSparsityConfig(2, num_sliding_window_blocks=5,
                                                                                   **UNI)  # fmt: skip
    whole = {"train_batch_size": 8, "sparse_attention": {"mode": "bslongformer", "block": 64}}
    assert sparsity_config_from_json(whole, 2) == BSLongformerSparsityConfig(2, block=64)
    assert sparsity_config_from_json(json.dumps(whole), 2) == BSLongformerSparsityConfig(2, block=64)
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(whole))
    assert sparsity_config_from_json(path, 2) == BSLongformerSparsityConfig(2, block=64)


def test_json_errors():
    with pytest.raises(NotImplementedError, match="Given sparsity mode, local, has not been implemented"):
        sparsity_config_from_json({"mode": "local"}, 2)
    with pytest.raises(ValueError, match=r"unknown keys in the sparse_attention section: \['num_locl_blocks'\]"):
        sparsity_config_from_json({"mode": "fixed", "num_locl_blocks": 2}, 2)
    with pytest.raises(TypeError, match="section must be a dict"):
        sparsity_config_from_json([1, 2], 2)
    with pytest.raises(ValueError, match="num_local_blocks must be a positive integer"):
        sparsity_config_from_json({"num_local_blocks": "4"}, 2)
    with pytest.raises(TypeError, match="horizontal_global_attention must be True or False"):
        sparsity_config_from_json({"horizontal_global_attention": "yes"}, 2)


@pytest.mark.parametrize("n_q, n_k", [(8, 20), (20, 8)])
@pytest.mark.parametrize("attention", ["bidirectional", "unidirectional"])
def test_cross_attention_is_the_corner_of_the_square_pattern(n_q, n_k, attention):
    config = FixedSparsityConfig(2, block=4, num_local_blocks=2, num_global_blocks=1, attention=attention)
    square = config.token_mask(max(n_q, n_k))
    np.testing.assert_array_equal(config.token_mask(n_q, n_k), square[:, :n_q, :n_k])
    active, full = config.block_classes(n_q, n_k, 4)
    np.testing.assert_array_equal(active, config.block_layout(max(n_q, n_k), max(n_q, n_k), 4)[:, : n_q // 4, : n_k // 4])
    assert full.sum() < active.sum() if attention == "unidirectional" else (full == active).all()
