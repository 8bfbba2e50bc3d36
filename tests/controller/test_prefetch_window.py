"""The scored policy's prefetch window, chosen by replaying a dense pass: the replay's bookkeeping, the choice on
SmolLM2's real block sizes, and the replay against the ledger that then runs it."""

import dataclasses

import pytest

from vorch_jax.config import load_config
from vorch_jax.controller.pass_plan import horizon_plan, pass_plans
from vorch_jax.controller.prefetch_window import (BYTES_OVER_BOUND, BYTES_TOLERANCE, CANDIDATE_SIZE_POWERS,
                                                  CANDIDATE_WINDOWS, TIME_TOLERANCE, TO_END_MIN_SAVING, Timing,
                                                  choose_eviction_rule, choose_window, landing_held, lower_bounds,
                                                  replay)
from vorch_jax.models.gemma import VOCAB_SHARDS
from vorch_jax.policies.baselines import LET_GO_READS, POSITIONS
from vorch_jax.policies.lower_bound import lower_bound
from vorch_jax.runtime.setup import build_setup
from vorch_jax.simulation.hardware import load_profile


def pass_of(model="smollm2-135m", budget=0.5, every_lookup=False):
    """One pass of `model` as the scored policy plans on it (`every_pass`), or with `every_lookup` the skeleton's
    whole pass: Gemma's as it ran until 2026-12-07, a lookup in each of the sixteen vocabulary shards before the
    layers (each shard read twice a pass, as a user's model may read a block), what the rule tests below use."""
    cfg = load_config("configs/demo.yaml", [f"model={model}", f"hbm_budget={budget}"]
                      + (["placement=[]"] if model != "smollm2-135m" else []))  # the demo protects SmolLM2's blocks
    st = build_setup(cfg, simulated=True)
    blocks = [p.block for p in (st.spec.skeleton() if every_lookup else st.spec.every_pass())]
    initial = list(st.protected) + [b for b in dict.fromkeys(blocks) if b not in st.protected]
    return blocks, st.device_bytes, st.hbm_budget, st.protected, initial


def test_a_budget_that_holds_the_pass_moves_each_block_once_and_never_misses():
    blocks = ["a", "b", "c", "a"]
    sizes = {"a": 3, "b": 1, "c": 2}
    for w in CANDIDATE_WINDOWS:
        r = replay(blocks, sizes, 6, frozenset(), ["a", "b", "c"], depth=2, window=w, passes=4)
        assert (r.bytes_moved, r.misses) == (6, 0)


def test_without_prefetch_every_load_is_a_miss_of_the_block_read_furthest_ahead():
    # budget 2 of 3 unit blocks, a b c a b c ...: each miss evicts the block read furthest ahead (Belady): after the
    # cold placement of a, b, the first c evicts b (read at 4, after a at 3), and so on: one miss every other read.
    r = replay(["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, 2, frozenset(), ["a", "b"], depth=0, window=1, passes=4)
    assert r.misses == 5 and r.bytes_moved == 2 + 5


def test_the_replay_clock_adds_compute_and_the_waits_for_loads():
    unit = {"a": 1, "b": 1, "c": 1}
    timing = Timing.at_rate(0.1, unit, compute_s={"a": 1.0, "b": 1.0, "c": 1.0})
    held = replay(["a", "b", "c"], unit, 3, frozenset(), ["a", "b", "c"], depth=2, window=1, passes=4, timing=timing)
    assert held.modelled_s == 12.0  # placed before the clock starts: only compute
    r = replay(["a", "b", "c"], unit, 2, frozenset(), ["a", "b"], depth=0, window=1, passes=4, timing=timing)
    assert r.misses == 5 and r.modelled_s == 12.0 + 5 * 10.0  # without prefetch every load is waited for
    assert r.load_s == 7 * 10.0  # the link seconds of every load, the initial placement's two included
    hidden = replay(["a", "b"], {"a": 1, "b": 1}, 2, frozenset(), ["a"], depth=1, window=1, passes=1,
                    timing=Timing({"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 1.0}))
    assert hidden.misses == 0 and hidden.modelled_s == 3.0  # b loads while a computes


def test_where_loads_cost_seconds_not_bytes_the_choice_follows_the_plan_priced_in_seconds():
    """A 6-byte block beside four 3-byte ones, room for 15, a small block's load taking ten times the large one's
    (as on this CPU a small block lands at half the rate per byte, `link_probe.probe_block_loads`): the optimum by
    bytes lets two small blocks go each pass (6 bytes, 20 s), the optimum by seconds the large one and one small
    one (9 bytes, 11 s). Priced in seconds, the choice follows a plan priced in seconds: among the steady states, the
    quickest on the link moves more bytes than the fewest-bytes one. The run's 8 passes to their end, priced in
    seconds, need no steady state's compromise here: least link time (112 s) and least bytes at once."""
    blocks, size = list("Labcd"), {"L": 6, "a": 3, "b": 3, "c": 3, "d": 3}
    timing = Timing({"L": 1.0, "a": 10.0, "b": 10.0, "c": 10.0, "d": 10.0}, dict.fromkeys(size, 0.1))
    best, replays, plan = choose_eviction_rule(blocks, size, 15, frozenset(), blocks, 1, 8, timing=timing)
    steady = [r for r in replays if "to the end" not in r.plan]
    quickest = min(steady, key=lambda r: (r.load_s, r.bytes_moved))
    assert quickest.load_s < min(r.load_s for r in replays if r.plan == "1-pass")
    assert quickest.plan == "3-pass by time" and quickest.bytes_moved > min(r.bytes_moved for r in steady)  # it
    # rotates the small block that goes (1-pass by time: 11 s a pass)
    assert best.load_s == min(r.load_s for r in replays) < quickest.load_s
    assert best.bytes_moved == min(r.bytes_moved for r in replays)
    assert plan is not None and plan.by_time and plan.to_end and best.plan == plan.name
    bytes_best, bytes_replays, bytes_plan = choose_eviction_rule(blocks, size, 15, frozenset(), blocks, 1, 8)  # no
    # timing: the fewest bytes, by a plan priced in bytes
    assert bytes_best.bytes_moved == min(r.bytes_moved for r in bytes_replays)
    assert not (bytes_plan and bytes_plan.by_time)


def test_a_bytes_weight_trades_link_seconds_for_bytes():
    """The same blocks over 4 passes in room for 12: priced in link seconds alone, the choice moves 42 bytes in
    102 s; with bytes weighed 100x a second at the mean rate, 39 bytes in 111 s. The weight changes what plans
    minimise and what candidates are compared by, not the clock, and a weight of 0 is the seconds' choice."""
    blocks, size = list("Labcd"), {"L": 6, "a": 3, "b": 3, "c": 3, "d": 3}
    timing = Timing({"L": 1.0, "a": 10.0, "b": 10.0, "c": 10.0, "d": 10.0}, dict.fromkeys(size, 0.1))
    assert timing.with_bytes_weight(0.0, size) == timing
    by_seconds, seconds_replays, _ = choose_eviction_rule(blocks, size, 12, frozenset(), blocks, 1, 4, timing=timing)
    weighed = timing.with_bytes_weight(100.0, size)
    assert weighed.byte_price_s == pytest.approx(100.0 * 41.0 / 18)  # the mean link seconds per byte, x100
    by_bytes, replays, plan = choose_eviction_rule(blocks, size, 12, frozenset(), blocks, 1, 4, timing=weighed)
    assert plan is not None and plan.name == by_bytes.plan == "4-pass to the end by time and bytes"
    assert (by_seconds.bytes_moved, by_seconds.load_s) == (42, 102.0)
    assert (by_bytes.bytes_moved, by_bytes.load_s) == (39, 111.0)
    assert by_bytes.bytes_moved == min(r.bytes_moved for r in replays)
    size_rules = lambda rs: {(r.window, r.size_power, r.counts): r for r in rs if not r.plan}  # noqa: E731
    assert size_rules(replays) == size_rules(seconds_replays)  # replayed alike: same bytes, seconds and clock


def test_a_load_after_dropping_a_block_of_its_size_is_priced_as_landing_in_held_memory():
    """The engine lands a load in the memory of a dropped block of the same shapes where it holds one (`DevicePool`),
    several times faster on this CPU than in new memory: the replay prices each load so, one second held, ten fresh."""
    timing = Timing({"a": 1.0, "b": 1.0, "c": 1.0}, dict.fromkeys("abc", 0.0), fresh_load_s={"a": 10.0, "b": 10.0,
                                                                                           "c": 10.0})
    same = replay(list("abc"), dict.fromkeys("abc", 1), 2, frozenset(), ["a", "b"], depth=0, window=1, passes=4,
                  timing=timing)
    assert same.misses == 5 and same.load_s == 2 * 1.0 + 5 * 1.0  # each miss follows the drop of a block of its size
    mixed = replay(["a", "b"], {"a": 1, "b": 2}, 2, frozenset(), ["a", "b"], depth=0, window=1, passes=3,
                   timing=dataclasses.replace(timing, load_s={"a": 1.0, "b": 1.0}, fresh_load_s={"a": 10, "b": 10}))
    assert mixed.misses == 5 and mixed.load_s == 1.0 + 5 * 10.0  # never a dropped block of the size it needs
    unpooled = replay(list("abc"), dict.fromkeys("abc", 1), 2, frozenset(), ["a", "b"], depth=0, window=1,
                      passes=4, timing=dataclasses.replace(timing, fresh_load_s=None))
    assert unpooled.load_s == same.load_s  # without fresh prices every load costs `load_s`
    held = ["x", "z"]
    assert landing_held(held, "y", {"x": 2, "y": 2, "z": 1}, 1, timing) and held == ["z"]
    assert not landing_held(held, "y", {"x": 2, "y": 2, "z": 1}, 0, timing) and held == []  # trimmed to the room


def test_a_fresh_landing_is_never_priced_below_a_held_one_so_no_replay_beats_the_bound_in_seconds():
    """A probe that lands a block in new memory quicker than in held memory is noise (allocating never saves time),
    and believed, it would price a replay's fresh landings below the bound in seconds (the LP prices every load
    held): `Timing` takes the held price where the fresh probe came out lower."""
    size = {"a": 1, "b": 2, "c": 1}
    timing = Timing({"a": 1.0, "b": 3.0, "c": 1.0}, dict.fromkeys(size, 0.0), fresh_load_s={"a": 0.5, "b": 4.0,
                                                                                           "c": 2.0})
    assert timing.fresh_load_s == {"a": 1.0, "b": 4.0, "c": 2.0}
    blocks = list("abcab")
    _, seconds = lower_bounds(blocks * 4, size, 3, frozenset(), timing)
    _, replays = choose_window(blocks, size, 3, frozenset(), ["a", "b"], 1, 4, timing=timing)
    assert min(r.load_s for r in replays) >= seconds > 0


def test_the_timed_choice_is_the_quickest_within_the_bytes_allowed():
    """SmolLM2 at 0.3: W = 1 moves the fewest bytes but starts each load one position ahead; within the bytes the
    choice allows, a wider window starts them earlier (measured: 10.2 against 12.6 tok/s for W = 3, this CPU)."""
    blocks, sizes, budget_bytes, protected, initial = pass_of(budget=0.3)
    total = sum(sizes[b] for b in blocks)
    timing = Timing.at_rate(6e9, sizes, {b: 0.045 * sizes[b] / total for b in set(blocks)})
    bound = lower_bound(blocks * 16, sizes, budget_bytes, pinned=protected).bytes
    best, replays = choose_window(blocks, sizes, budget_bytes, protected, initial, 2, 16, timing=timing,
                                  bounds=(bound, bound / 6e9))  # one rate: link seconds are bytes over it
    fewest = min(r.bytes_moved for r in replays)
    allowed = [r for r in replays if r.bytes_moved <= max((1 + BYTES_TOLERANCE) * fewest, BYTES_OVER_BOUND * bound)]
    assert best in allowed and best.modelled_s <= (1 + TIME_TOLERANCE) * min(r.modelled_s for r in allowed)
    assert best.window > 1 and best.modelled_s < min(r.modelled_s for r in replays if r.bytes_moved == fewest)


def test_a_protected_block_is_never_a_victim():
    # budget 2: the protected a stays; b and c alternate in the one remaining unit, every read a miss
    r = replay(["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, 2, frozenset({"a"}), ["a", "b"], depth=0, window=1,
               passes=3)
    assert r.misses == 5 and r.bytes_moved == 2 + 5


def test_a_block_too_large_for_the_budget_beside_the_protected_ones_is_one_line():
    with pytest.raises(ValueError, match="does not fit"):
        replay(["a", "b"], {"a": 2, "b": 2}, 3, frozenset({"a"}), ["a"], depth=1, window=1, passes=2)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_the_chosen_window_misses_least_among_those_within_the_tolerance(budget):
    best, replays = choose_window(*pass_of(budget=budget), depth=2, passes=16)
    assert [(r.size_power, r.window, r.counts) for r in replays] == [
        (p, w, c) for p in CANDIDATE_SIZE_POWERS for w in CANDIDATE_WINDOWS for c in (POSITIONS, LET_GO_READS)]
    fewest = min(r.bytes_moved for r in replays)
    chosen = best
    assert chosen.bytes_moved <= (1 + BYTES_TOLERANCE) * fewest
    assert all(chosen.misses <= r.misses for r in replays if r.bytes_moved <= (1 + BYTES_TOLERANCE) * fewest)


def test_on_smollm2_at_half_the_bytes_a_window_of_reads_reaches_past_the_protected_blocks():
    # Counted in positions, W = 1 waits for a miss where the pass wraps: the protected blocks read between the last
    # layer and the next pass's first leave it no victim (6 misses in 16 passes); a wider window of positions frees
    # the room but moves more than the tolerance. Counted in reads of blocks a prefetch may evict, W = 1 reaches the
    # last layer's block there: no miss, within the tolerance of the fewest bytes, so the choice takes it.
    best, replays = choose_window(*pass_of(budget=0.5), depth=2, passes=16)
    by = {(r.window, r.counts): r for r in replays if r.size_power == best.size_power}
    assert 0 < by[(1, POSITIONS)].misses <= 8 and by[(1, LET_GO_READS)].misses == 0
    assert all(r.bytes_moved > (1 + BYTES_TOLERANCE) * by[(1, POSITIONS)].bytes_moved
               for (w, c), r in by.items() if c == POSITIONS and r.misses == 0)
    assert (best.window, best.counts, best.misses) == (1, LET_GO_READS, 0)


def test_a_window_of_reads_across_protected_blocks_can_ping_pong_where_positions_rotate():
    """Four blocks in three slots between two protected ones: counting reads, W = 1 reaches across the protected
    blocks and evicts the same two blocks in turn (2 loads a pass); counting positions, W = 2 rotates through all
    four (4/3 a pass, Belady's), so the choice counts positions there."""
    blocks, sizes = ["x", "a", "b", "c", "d", "y"], dict.fromkeys(["x", "a", "b", "c", "d", "y"], 10)
    args = (blocks, sizes, 50, frozenset({"x", "y"}), ["x", "y", "a", "b", "c", "d"])
    reads = replay(*args, depth=1, window=1, passes=8, counts=LET_GO_READS)
    positions = replay(*args, depth=1, window=2, passes=8)
    assert (reads.misses, positions.misses) == (0, 0) and reads.bytes_moved == 200 and positions.bytes_moved == 160
    best, _ = choose_window(*args, depth=1, passes=8)
    assert best.counts == POSITIONS and best.bytes_moved == 160


@pytest.mark.parametrize("model, budget", [("smollm2-135m", 0.3), ("smollm2-135m", 0.5), ("gemma3-270m", 0.3),
                                           ("gemma3-270m", 0.5), ("gemma3-270m", 0.8)])
def test_replay_counts_what_the_ledger_then_does(model, budget, tmp_path):
    """A simulated scored run moves over its passes what the replay of the same passes predicts (the run's first
    pass is the prompt's: the same blocks in the same order), with the window, size power and plan it chose (by
    the replays' modelled time on the profile's link and compute: `test_the_timed_choice_*` checks the choice).
    Gemma's passes also look their token up in one vocabulary shard, which the cursor does not know ahead; the
    lookup gathers its rows where the shard is (`Ledger._gather`), so it is no read of the stream either."""
    from vorch_jax.runtime.run import run

    cfg = load_config("configs/demo.yaml", [f"model={model}", f"hbm_budget={budget}", "executor=sim",
                                            "hardware=this-machine", "new_tokens=6", "prompt_tokens=8"]
                      + (["placement=[]"] if model != "smollm2-135m" else []))
    s = run(cfg, tmp_path)
    w, p = s["prefetch"]["victims_read_within"], s["prefetch"]["victim_size_power"]
    blocks, sizes, budget_bytes, protected, initial = pass_of(model, budget)
    passes = (s["hits"] + s["misses"]) // len(blocks)
    assert passes * len(blocks) == s["hits"] + s["misses"] and passes == 6
    name, plan = s["prefetch"]["follows_plan"], None
    if name:
        cycle = int(name.split("-")[0])
        link = load_profile("this-machine").host_to_device  # the simulated run prices its loads by it
        load_cost = {b: link.seconds(sizes[b]) for b in sizes}
        plans = pass_plans(blocks, sizes, budget_bytes, protected, passes=cycle, load_cost=load_cost)
        if "to the end" in name:  # the optimum of the run's own passes (`horizon_plan`)
            plans = [horizon_plan(blocks, sizes, budget_bytes, protected, cycle, load_cost)]
        plan = {q.name: q for q in plans}[name]
    r = replay(blocks, sizes, budget_bytes, protected, initial, depth=2, window=w, passes=passes, size_power=p,
               plan=plan, counts=s["prefetch"]["window_counts"])
    assert s["misses"] == r.misses
    assert s["bytes_moved"] == r.bytes_moved
    if model == "gemma3-270m":  # each pass's lookup gathered its rows where its shard was: no read, no load
        assert s["lookups"]["on_device"] + s["lookups"]["in_place"] == passes


def four_shard_gemma(budget):
    """Gemma 3's pass with its embedding as four 168 MB blocks beside 6.6-15.7 MB layer blocks (the model's split
    until 2026-12-07; it is sixteen 42 MB shards now): each four consecutive shards one block, the reads of a merged
    block in a row one read. The rules below are for blocks that differ in size by 25x, as a user's model may."""
    blocks, sizes, budget_bytes, protected, initial = pass_of("gemma3-270m", budget, every_lookup=True)
    group = VOCAB_SHARDS // 4

    def merged(b):
        return f"embed.{int(b.split('.')[1]) // group}" if b.startswith("embed.") else b

    stream = []
    for b in map(merged, blocks):
        if not (stream and b == stream[-1] and b.startswith("embed.")):
            stream.append(b)
    merged_sizes = {}
    for b, n in sizes.items():
        merged_sizes[merged(b)] = merged_sizes.get(merged(b), 0) + n
    assert not any(b.startswith("embed.") for b in protected)
    return stream, merged_sizes, budget_bytes, protected, list(dict.fromkeys(map(merged, initial)))


def test_four_shard_gemma_is_the_stream_of_four_168_mb_blocks():
    blocks, sizes, *_ = four_shard_gemma(0.3)
    shards = [f"embed.{k}" for k in range(4)]
    assert blocks[:5] == [*shards, "layers.0.attn"] and blocks[-4:] == shards
    assert {b for b in blocks if b.startswith("embed.")} == set(shards)
    assert all(167e6 < sizes[b] < 168e6 for b in shards)


def test_on_gemma_at_a_third_of_the_bytes_size_weighted_victims_move_less():
    """Four 168 MB embedding shards beside 6.6-15.7 MB layer blocks: evicting by distance x size moves about 7%
    fewer bytes than furthest-next-use at 0.3 (replayed, 16 passes), and the choice takes it."""
    args = four_shard_gemma(0.3)
    best, replays = choose_window(*args, depth=2, passes=16)
    fewest = {p: min(r.bytes_moved for r in replays if r.size_power == p) for p in CANDIDATE_SIZE_POWERS}
    assert best.size_power == 1.0 and fewest[1.0] < 0.95 * fewest[0.0]
    assert {r.size_power for r in replays} == set(CANDIDATE_SIZE_POWERS)


def bound_of(args, passes=16):
    from vorch_jax.policies.lower_bound import lower_bound

    blocks, sizes, budget, protected, _ = args
    return lower_bound(blocks * passes, sizes, budget, pinned=protected).bytes


def test_on_gemma_at_half_the_bytes_the_choice_follows_the_optimum_of_three_passes():
    """Gemma 3 with four embedding shards, each looked up every pass, at 0.5: every size rule moves about 1.38x the
    LP bound over 16 passes, the steady state of one pass (`pass_plans`: which reads keep their block until the
    next) about 1.15x; every rule and one-pass plan lies more than PLAN_MORE_OVER_BOUND above the bound, so the cycle
    of three passes is solved too, where the four embedding shards take turns leaving: about 1.075x (the proven
    optimum of 16 passes: 1.074x), and the choice takes it."""
    args = four_shard_gemma(0.5)
    one = pass_plans(*args[:4])
    assert one and not all(one[0].keeps.values())  # some reads let their block go
    best, replays, plan = choose_eviction_rule(*args, depth=2, passes=16)
    bound = bound_of(args)
    assert plan is not None and plan.passes == 3 and best.plan == plan.name
    rules = [r for r in replays if not r.plan]
    one_pass = [r for r in replays if r.plan == one[0].name]
    assert best.bytes_moved < 1.09 * bound < 1.12 * bound < min(r.bytes_moved for r in one_pass)
    assert 1.3 * bound < min(r.bytes_moved for r in rules)


def test_on_gemma_at_four_fifths_the_choice_keeps_the_plans_large_blocks_and_streams_the_small_ones():
    """Gemma 3 looking up every shard each pass, at 0.8: the one-pass steady state keeps a fixed set (about 1.04x
    the bound); the optimum of 16 passes keeps the embedding shards and rotates which layer blocks stream. The
    candidate that follows the plan for the shards and lets every smaller block go, furthest next read first, moves
    within 1.03x, and is chosen."""
    args = pass_of("gemma3-270m", 0.8, every_lookup=True)
    best, replays, plan = choose_eviction_rule(*args, depth=2, passes=16)
    bound = bound_of(args)
    assert plan is not None and plan.streamed_below > 0 and best.plan == plan.name
    assert best.bytes_moved <= 1.03 * bound
    fixed = [r for r in replays if r.plan == pass_plans(*args[:4])[0].name]
    assert fixed and min(r.bytes_moved for r in fixed) > 1.03 * bound


def test_on_gemma_at_half_the_bytes_the_optimum_of_the_runs_own_passes_moves_less_than_any_steady_state():
    """Gemma 3's pass (sixteen 42 MB shards, layer blocks of 6.6-15.7 MB) at 0.5, 16 passes: every steady-state
    candidate keeps, in the last passes too, what a next pass would need; the optimum of the run's own passes
    (`horizon_plan`) does not, and its replay moves fewer bytes than every other candidate's (measured: 1.016x the
    LP bound against 1.026x), and the choice follows it."""
    args = pass_of("gemma3-270m", 0.5)
    best, replays, plan = choose_eviction_rule(*args, depth=2, passes=16)
    steady = [r for r in replays if "to the end" not in r.plan]
    assert plan is not None and plan.to_end and plan.passes == 16 and best.plan == plan.name
    assert best.bytes_moved < min(r.bytes_moved for r in steady)
    assert best.bytes_moved <= 1.03 * bound_of(args)


def test_the_optimum_to_the_end_is_followed_only_where_it_saves_a_share_of_the_bytes(monkeypatch):
    """At 0.8 the plan to the end also moves less than every steady-state candidate (1.025x the LP bound against
    1.037x for the choice without it): its candidate without a miss saves 1.2%, so it is followed at the default
    TO_END_MIN_SAVING (1%) and not where the share asked is 2% (the constant's comment has what following it cost
    on SmolLM2)."""
    import vorch_jax.controller.prefetch_window as pw

    args = pass_of("gemma3-270m", 0.8)
    best, replays, plan = choose_eviction_rule(*args, depth=2, passes=16)
    to_end = [r for r in replays if "to the end" in r.plan]
    steady = [r for r in replays if "to the end" not in r.plan]
    assert to_end and min(r.bytes_moved for r in to_end) < min(r.bytes_moved for r in steady)
    assert plan is not None and plan.to_end and best.plan == plan.name and not best.misses
    monkeypatch.setattr(pw, "TO_END_MIN_SAVING", 0.02)
    held_back, _, steady_plan = choose_eviction_rule(*args, depth=2, passes=16)
    assert not (steady_plan and steady_plan.to_end) and "to the end" not in held_back.plan
    saving = 1 - best.bytes_moved / held_back.bytes_moved
    assert TO_END_MIN_SAVING <= saving < 0.02
