"""A short soak in CI (PDSERVE_SOAK_S seconds, 60 by default): nothing leaked, nothing wrong."""
import os
import random

import pytest

from tiny_models import reference_tokens
from soak import run_soak

from pdserve.engine.tokenizer import load_tokenizer

pytestmark = pytest.mark.e2e


def test_soak_with_kills_leaks_nothing(chat_model, one_and_two):
    directory, model = chat_model
    tokenizer = load_tokenizer(directory)
    prompts = [tuple(random.Random(i).randrange(3, 49000) for _ in range(8 + 9 * i)) for i in range(4)]
    expected = {p: tokenizer.decode(reference_tokens(model, list(p), 40)) for p in prompts}
    seconds = float(os.environ.get("PDSERVE_SOAK_S", "60"))
    report = run_soak(one_and_two, expected, seconds, kill_every_s=seconds / 2)
    summary = report.summary()
    assert report.replicas_killed >= 1, summary
    assert report.outcomes["normal:ok"] > 0, summary
    assert report.wrong_outputs == 0, summary
    assert report.blocks_leaked == 0 and report.outstanding == 0, summary
    assert {k for k in report.outcomes if k.startswith("invalid:")} == {"invalid:400"}, summary
    assert {k for k in report.outcomes if k.startswith("oversized:")} <= {"oversized:400", "oversized:413"}, summary
    assert not any(k.endswith(":500") or k.endswith("error_event") for k in report.outcomes), summary
