"""The engine's warnings held back in one thread (`notices.quiet`), never by swapping the
process-wide filters that other threads share."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from cam_monitor import compute_cams, notices, sanity_check
from tests.helpers import TinyCNN, catch_warnings_entries, shapes


def test_quiet_holds_back_this_threads_warnings_only() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with notices.quiet():
            notices.warn("held back")
            other = threading.Thread(target=notices.warn, args=("from another thread",))
            other.start()
            other.join()
            with notices.quiet():  # nested: still quiet after the inner block
                pass
            notices.warn("held back too")
        notices.warn("shown", RuntimeWarning)
    assert [(str(w.message), w.category) for w in seen] == [
        ("from another thread", UserWarning),
        ("shown", RuntimeWarning),
    ]


def test_the_sanity_check_holds_back_its_copys_warnings_without_swapping_the_filters() -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    images = shapes(4, seed=3)[0]
    # gradcam++ after a BatchNorm (signed activations) warns once per model: the randomised
    # copy is a new model at every check, so it would warn at every evaluation.
    with pytest.warns(UserWarning, match="gradcam\\+\\+ at layer 'features.1'"):
        real = compute_cams(model, images, "features.1", "gradcam++")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with catch_warnings_entries() as entered:
            found = sanity_check(model, images, "features.1", "gradcam++", real=real)
    assert entered == [] and found["features.1", "gradcam++"].shape == (4,)
