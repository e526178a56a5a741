import gc
import weakref

from config.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_live_objects_leave_the_collected_generations_and_garbage_goes_first() -> None:
    kept = [Node() for _ in range(1000)]
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle only a collection frees
    dead = weakref.ref(a)
    del a, b
    try:
        frozen = freeze_startup_heap()
        assert dead() is None, "garbage present at start-up was frozen instead of freed"
        assert frozen >= len(kept)
        collected = {id(o) for o in gc.get_objects()}
        assert not any(id(node) in collected for node in kept)
        later = Node()  # made after the freeze: full collections still walk it
        assert id(later) in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()
