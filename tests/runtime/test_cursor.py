"""The pass cursor of a dense model: what it knows ahead, and that nothing is prefetched past the run's last pass."""

from vorch_jax.config import load_config
from vorch_jax.runtime.cursor import PassCursor
from vorch_jax.runtime.setup import build_setup


def test_the_last_pass_knows_no_next_pass_to_prefetch_but_still_orders_by_it():
    """Before the run's last pass ends, `ahead` (what prefetching reads) runs out at the pass's end, where any other
    pass's reaches into the next one; distances to a block's next read (what orders victims) are the same either
    way. Before 2026-12-07 every prefetching policy loaded a block or two at the end of a run for a pass that never
    came."""
    spec = build_setup(load_config("configs/demo.yaml", ["model=smollm2-135m"]), simulated=True).spec
    order = [p.block for p in spec.every_pass()]
    seen = {}
    for last in (False, True):
        cursor = PassCursor(spec)
        cursor.begin_pass(last=last)
        aheads, uses = [], []
        while cursor.next() is not None:
            aheads.append(cursor.ahead(2))
            uses.append(cursor.next_uses(order))
            assert cursor.ahead(2) == aheads[-1]  # again from the known list `next_uses` built
        seen[last] = aheads, uses
    (ahead_any, uses_any), (ahead_last, uses_last) = seen[False], seen[True]
    assert ahead_any[-1] == order[:2] and ahead_any[-2] == [order[-1], order[0]]
    assert ahead_last[-1] == [] and ahead_last[-2] == [order[-1]]
    assert ahead_last[:-2] == ahead_any[:-2]
    assert uses_last == uses_any
