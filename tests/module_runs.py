"""Which of a test module's tests this process runs, for fixtures that start long runs early."""

import pytest

# The pytest-xdist modes that hand a test module to one process whole (`no`: plain pytest).
WHOLE_MODULE_MODES = ("no", "loadfile", "loadscope")


def tests_of_this_module(request: pytest.FixtureRequest) -> list[pytest.Item]:
    """The selected tests of the requesting module, if this process runs all of them.

    Empty otherwise: under pytest-xdist's `--dist load` a module's tests spread over workers,
    and each worker would start the module's long runs; they then start when a test first asks
    for them.
    """
    if request.config.getoption("dist", "no") not in WHOLE_MODULE_MODES:
        return []
    return [item for item in request.session.items if item.module is request.module]
