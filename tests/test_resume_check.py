"""--resume keeps the spec the search started with (sdd_search.resume_check)."""

from __future__ import annotations

import json

from sdd_search import resume_check
from sdd_search.spec import load_spec


def test_a_resume_that_changes_what_is_trained_is_refused_naming_the_field(write_spec, tmp_path):
    spec = load_spec(write_spec())
    resume_check.record(spec)
    recorded = tmp_path / "runs" / "tiny" / "spec.json"
    assert json.loads(recorded.read_text())["search.num_trials"] == 3

    assert resume_check.changed_field(spec) is None
    more = load_spec(write_spec(), ["search.num_trials=5"])
    line = resume_check.changed_field(more)
    assert line == (
        "--resume: search.num_trials is 5 here but the search started with 3; a resumed search "
        "keeps its spec (put it back, or --set name=... to start another search)"
    )
    other_space = load_spec(write_spec({"space": {"temperature": {"low": 2.0, "high": 8.0}}}))
    assert "space.temperature.low is 2.0 here but the search started with 1.0" in (
        resume_check.changed_field(other_space) or ""
    )
    # Where and how fast may change: more workers at once, another tracking server.
    moved = load_spec(
        write_spec(
            {
                "search": {"max_concurrent": 1},
                "resources": {"cpus_per_worker": 2},
                "tracking": {"uri": f"sqlite:///{tmp_path}/elsewhere.db"},
            }
        )
    )
    assert resume_check.changed_field(moved) is None


def test_a_search_from_before_the_record_gets_one_and_resumes(write_spec, tmp_path):
    spec = load_spec(write_spec())
    assert resume_check.changed_field(spec) is None  # nothing recorded: written now
    assert (tmp_path / "runs" / "tiny" / "spec.json").is_file()
    assert resume_check.changed_field(load_spec(write_spec(), ["train.epochs=3"]))
