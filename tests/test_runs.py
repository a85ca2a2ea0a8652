"""emo_trainer.runs: the run-directory layout (a checkpoint finds its run's config and objective)."""

from emo_trainer.runs import CONFIG_FILENAME, find_run_config, find_trainer_state, read_run_config, run_objective


def test_a_checkpoint_finds_its_run(tmp_path):
    run = tmp_path / "run"
    for d in ("final", "checkpoint-2", "checkpoint-10"):
        (run / d).mkdir(parents=True)
    assert find_run_config(run / "final") is None and run_objective(run / "final") is None
    (run / CONFIG_FILENAME).write_text("objective:\n  name: mixce\n")
    for path in (run, run / "final", run / "checkpoint-2"):
        assert find_run_config(path) == run / CONFIG_FILENAME
        assert run_objective(path) == "mixce"
    (run / CONFIG_FILENAME).write_text("objective: {}\n")  # the config's default objective
    assert run_objective(run / "final") == "mle"
    (run / CONFIG_FILENAME).write_text("model: [unclosed\n")  # unreadable: no answer rather than a crash
    assert read_run_config(run) == {} and run_objective(run) is None


def test_trainer_state_prefers_the_run_then_the_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert find_trainer_state(run) is None
    for n in (2, 10):
        (run / f"checkpoint-{n}").mkdir(parents=True)
        (run / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    assert find_trainer_state(run) == run / "checkpoint-10" / "trainer_state.json"  # numeric, not lexical
    (run / "trainer_state.json").write_text("{}")
    assert find_trainer_state(run) == run / "trainer_state.json"
