"""The fault suite in CI: SIGKILL the workflow while it fetches, caches (mid-array) and trains
(after a checkpoint), rerun after each kill, and check that the outputs equal an uninterrupted
run's (tests/fault_suite.py; `python tests/fault_suite.py --kills 20` for the long version)."""

from fault_suite import report, suite

KILLS = [
    ("fetch", 0.0),
    ("resources/cache/**/cache.npy.partial", 0.0),  # while a cache array is being written
    ("results/runs/**/checkpoint.pt", 0.0),  # a training run after its first epoch
]


def test_killed_workflow_resumes_to_the_same_outputs(tmp_path):
    result = suite(tmp_path, KILLS)
    print(report(result))
    stages = [k.running for k in result["kills"]]
    assert "fetch" in stages[0] and "cache" in stages[1] and "train" in stages[2], report(result)
    assert not result["problems"], report(result)
    # the killed training run resumed from its checkpoint instead of starting again
    logs = list((result["faulted"] / "logs/train").rglob("*.log.attempts"))
    assert any("resuming" in p.read_text() for p in logs), [p.read_text()[-500:] for p in logs]
