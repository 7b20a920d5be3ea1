"""config.py: the flags' --help groups and the method flags' mapping onto the loss keywords."""
import pytest

import config
import losses


def test_help_is_grouped_and_every_flag_is_in_one_group():
    parser = config.build_parser()
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    for title in ("run", "data", "model", "rollout", "optimisation", "evaluation", *config.KNOB_GROUPS):
        assert groups[title], title
    assert groups["optimisation"][:2] == ["lr", "optimizer"] and "algo" in groups["run"]
    flags = [d for title, dests in groups.items() if title not in ("options", "positional arguments")
             for d in dests]
    assert sorted(flags) == sorted(set(flags))                                   # each flag once
    assert set(flags) == {a.dest for a in parser._actions} - {"help"}            # none outside a group
    assert {d for t in config.KNOB_GROUPS for d in groups[t]} == set(config.KNOB_FLAGS)


@pytest.mark.parametrize("key", sorted(config.KNOB_FLAGS))
def test_every_method_flag_names_one_knob_under_one_name(key):
    """A flag sets the keyword of the same name in every loss that has it (or the adaptive-entropy
    controller's); no per-method renames, and a flag that reaches no loss would be a typo."""
    _, name, _ = config.KNOB_FLAGS[key]
    assert isinstance(name, str)
    applies = [algo for algo in config.ALGOS if name in losses.LOSSES[algo].knobs
               or (losses.LOSSES[algo].adaptive and name in config.CONTROL_KEYS)]
    assert applies, key
    assert [k for k, (_, n, _) in config.KNOB_FLAGS.items() if n == name] == [key]      # one flag per knob


def test_the_ppo_clip_flags_reach_exactly_the_losses_that_take_them():
    for algo in config.ALGOS:
        cfg = dict({k: None for k in config.KNOB_FLAGS}, algo=algo, clip_low=0.1)
        if "clip_low" in losses.LOSSES[algo].knobs:
            assert config.knob_kwargs(cfg) == ({"clip_low": 0.1}, {})
        else:
            with pytest.raises(SystemExit, match=f"--clip-low does not apply to --algo {algo}"):
                config.knob_kwargs(cfg)
    no_clip_low = {a for a in config.ALGOS if "clip_low" not in losses.LOSSES[a].knobs}
    assert no_clip_low == {"opefo", "archer", "aspo", "kl_cov"}


def test_adaptive_entropy_sends_the_controller_flags_to_the_controller():
    cfg = dict({k: None for k in config.KNOB_FLAGS}, algo="adaptive_entropy", entropy_coef=0.01, target_entropy=0.3,
               clip_high=0.3)
    assert config.knob_kwargs(cfg) == ({"clip_high": 0.3}, {"coef": 0.01, "target": 0.3})
    cfg["algo"] = "entropy_bonus"
    with pytest.raises(SystemExit, match="--target-entropy does not apply to --algo entropy_bonus"):
        config.knob_kwargs(cfg)
    del cfg["target_entropy"]
    assert config.knob_kwargs(dict(cfg, target_entropy=None)) == ({"coef": 0.01, "clip_high": 0.3}, {})


def test_method_data_defaults_come_from_the_registry():
    parse = lambda *argv: config.resolve(config.build_parser().parse_args(list(argv)), log=lambda m: None)  # noqa: E731
    for algo in config.ALGOS:
        cfg = parse("--algo", algo)
        for key, value in losses.LOSSES[algo].data_defaults.items():
            assert cfg[key] == value, (algo, key)
    assert parse("--algo", "dapo", "--no-drop-equal-groups", "--max-refill-rounds", "0")["drop_equal_groups"] is False


def test_a_model_without_cuda_runs_cpu_sized_and_says_so(monkeypatch):
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    said = []
    cfg = config.resolve(config.build_parser().parse_args(["--model", "m", "--dataset", "d.jsonl",
                                                           "--eval-dataset", "e.jsonl", "--group-size", "8"]),
                         log=said.append)
    assert (cfg["prompts_per_step"], cfg["group_size"], cfg["max_new_tokens"], cfg["eval_k"]) == (2, 8, 64, 4)
    assert said == ["no CUDA: sized for a CPU (set a flag to override): --prompts-per-step 2 --max-new-tokens 64 "
                    "--eval-k 4 --eval-size 16"]
    said.clear()
    config.resolve(config.build_parser().parse_args(["--model", "m", "--dataset", "d.jsonl"]), log=said.append)
    assert said == ["no CUDA: sized for a CPU (set a flag to override): --prompts-per-step 2 --group-size 4 "
                    "--max-new-tokens 64"]                     # no evaluation set: its sizes not mentioned
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: True)
    cfg = config.resolve(config.build_parser().parse_args(["--model", "m", "--dataset", "d.jsonl"]), log=said.append)
    assert (cfg["max_new_tokens"], cfg["prompts_per_step"]) == (1024, 8) and len(said) == 1


def test_resume_of_a_folder_that_is_not_there_says_so(tmp_path):
    with pytest.raises(SystemExit, match=f"--resume {tmp_path / 'nope'}: no such run directory"):
        config.parse(["--resume", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no config.json there \\(not a train.py run directory\\)"):
        config.parse(["--resume", str(tmp_path)])
