import threading
import warnings

import pytest

from fmbseg.quiet import ignoring


class FirstWarning(UserWarning):
    pass


class SecondWarning(UserWarning):
    pass


def test_ignoring_silences_only_its_categories_and_restores_the_filters():
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ignoring(FirstWarning):
            warnings.warn("hidden", FirstWarning, stacklevel=1)
            warnings.warn("shown", SecondWarning, stacklevel=1)
        warnings.warn("shown again", FirstWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["shown", "shown again"]
    assert warnings.filters == before


def test_threads_inside_ignoring_at_once_leave_the_filters_as_they_were():
    # unlocked catch_warnings in these threads leaves filters behind (or drops them)
    before = list(warnings.filters)
    start = threading.Barrier(6)

    def churn(category: type[Warning]) -> None:
        start.wait()
        for _ in range(3000):
            with ignoring(category):
                pass

    threads = [
        threading.Thread(target=churn, args=(c,))
        for c in (FirstWarning, SecondWarning, DeprecationWarning) * 2
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == before


def test_an_exception_inside_ignoring_propagates_and_restores_the_filters():
    before = list(warnings.filters)
    with pytest.raises(KeyError), ignoring(FirstWarning):
        raise KeyError("x")
    assert warnings.filters == before
    with ignoring(FirstWarning):  # the lock was released: a second use does not block
        pass
