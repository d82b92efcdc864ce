"""CLI smoke tests for convert / distill / eval / generate / push on a tiny local teacher."""

import os
import stat

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fwp.cli import main
from tests.conversion.test_stage2 import TEXT, _tokenizer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = _tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None))
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    (root / "train.txt").write_text(TEXT * 2)
    return root


def test_convert_generate_and_errors(teacher_dir, capsys):
    out = teacher_dir / "converted"
    assert main(["convert", str(teacher_dir / "teacher"), str(out), "--keep-softmax", "every:2"]) == 0
    assert "1 FWP layers" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    fresh = str(teacher_dir / "never-written")
    assert main(["convert", str(teacher_dir / "teacher"), fresh, "--keep-softmax", "every:x"]) == 2
    assert "every:K" in capsys.readouterr().err
    assert main(["convert", str(teacher_dir / "missing.gguf"), fresh]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(teacher_dir / "teacher"), fresh, "--rule", "mamba"])


def test_cli_defaults_are_the_recommended_recipe(teacher_dir, capsys):
    from hf_fwp.conversion.pipeline import Recipe
    from hf_fwp.modeling import FWPConfig

    out = teacher_dir / "defaults"
    assert main(["convert", str(teacher_dir / "teacher"), str(out)]) == 0
    assert "2 FWP layers (hybrid_sliding)" in capsys.readouterr().out
    config, recipe = FWPConfig.from_pretrained(out), Recipe()
    assert (config.fwp_rule, config.feature_map) == (recipe.fwp_rule, recipe.feature_map)
    assert config.layer_types == [recipe.fwp_layer_type] * 2 and config.sliding_window == recipe.sliding_window
    assert config.hybrid_combine == recipe.hybrid_combine
    # A pure layout takes no window; a window is a positive number of tokens.
    pure = teacher_dir / "pure"
    assert main(["convert", str(teacher_dir / "teacher"), str(pure), "--layer-type", "linear_attention"]) == 0
    assert FWPConfig.from_pretrained(pure).sliding_window is None
    capsys.readouterr()
    fresh = str(teacher_dir / "never-written")
    assert main(["convert", str(teacher_dir / "teacher"), fresh, "--layer-type", "linear_attention",
                 "--window", "16"]) == 2
    assert "--window sets the window of hybrid_sliding layers" in capsys.readouterr().err
    assert main(["convert", str(teacher_dir / "teacher"), fresh, "--window", "0"]) == 2
    assert "positive number of tokens" in capsys.readouterr().err
    # Both ways of joining a hybrid layer's branches; a shared normaliser needs a linear rule.
    for combine in ("lerp", "shared_normalizer"):
        folder = teacher_dir / combine
        assert main(["convert", str(teacher_dir / "teacher"), str(folder), "--hybrid-combine", combine]) == 0
        assert FWPConfig.from_pretrained(folder).hybrid_combine == combine
    capsys.readouterr()
    assert main(["convert", str(teacher_dir / "teacher"), fresh, "--rule", "gated_delta", "--feature-map",
                 "identity", "--hybrid-combine", "shared_normalizer"]) == 2
    assert "--hybrid-combine must be 'lerp' here: 'shared_normalizer' needs" in capsys.readouterr().err
    assert not (teacher_dir / "never-written").exists()
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "(default: hedgehog)" in " ".join(capsys.readouterr().out.split())


def test_named_recipes(teacher_dir, capsys):
    from hf_fwp.conversion.recipe import NAMED_RECIPES, named_recipe
    from hf_fwp.modeling import FWPConfig

    out = teacher_dir / "pure-fwp"
    assert main(["convert", str(teacher_dir / "teacher"), str(out), "--recipe", "pure-fwp"]) == 0
    assert "2 FWP layers (linear_attention)" in capsys.readouterr().out
    config, recipe = FWPConfig.from_pretrained(out), named_recipe("pure-fwp")
    assert (config.fwp_rule, config.feature_map) == ("gated_linear", "hedgehog") == (recipe.fwp_rule,
                                                                                     recipe.feature_map)
    assert config.layer_types == ["linear_attention"] * 2 and config.sliding_window is None
    assert config.normalize_attention and not config.qk_l2norm  # what Recipe.convert_options() gives this layout
    # The parts that give the FWP the order of its context come with the named recipe (its fwp_options).
    assert (config.decay_init, config.use_short_conv, config.conv_activation) == ("mamba2", True, None)
    assert config.fwp_state_heads == recipe.fwp_state_heads == "query"  # the recipe's, not the hybrid's "kv"
    # A flag changes one field of the named recipe.
    out = teacher_dir / "pure-delta"
    assert main(["convert", str(teacher_dir / "teacher"), str(out), "--recipe", "pure-fwp", "--rule", "delta",
                 "--state-heads", "kv"]) == 0
    config = FWPConfig.from_pretrained(out)
    assert (config.fwp_rule, config.feature_map, config.layer_types[0]) == ("delta", "hedgehog", "linear_attention")
    assert config.use_short_conv and not config.fwp_rotary and config.fwp_state_heads == "kv"
    capsys.readouterr()
    fresh = str(teacher_dir / "never-written")
    assert main(["convert", str(teacher_dir / "teacher"), fresh, "--recipe", "pure-fwp", "--window", "16"]) == 2
    assert "--window sets the window of hybrid_sliding layers" in capsys.readouterr().err
    assert main(["convert", str(teacher_dir / "teacher"), fresh, "--recipe", "pure-fwp", "--keep-softmax", "all"]) == 2
    assert "--recipe would have no effect" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        main(["convert", str(teacher_dir / "teacher"), fresh, "--recipe", "mamba"])
    with pytest.raises(ValueError, match="choose one of hybrid, pure-fwp"):
        named_recipe("mamba")
    assert set(NAMED_RECIPES) == {"hybrid", "pure-fwp"}


def test_convert_never_overwrites_silently_and_writes_atomically(teacher_dir, capsys, monkeypatch):
    out = teacher_dir / "distilled-model"
    out.mkdir()
    (out / "README.md").write_text("a distilled model's card")
    (out / "results.json").write_text("{}")
    teacher = str(teacher_dir / "teacher")
    assert main(["convert", teacher, str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "results.json"]
    # A failure while writing leaves the old folder as it was and no half-written one.
    from transformers import PreTrainedTokenizerBase

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", broken)
    assert main(["convert", teacher, str(out), "--overwrite"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "a distilled model's card"
    assert [p.name for p in teacher_dir.iterdir() if p.name.startswith(".distilled-model")] == []
    monkeypatch.undo()
    assert main(["convert", teacher, str(out), "--overwrite"]) == 0
    assert (out / "config.json").exists() and not (out / "README.md").exists()  # replaced, not mixed
    a_file = teacher_dir / "out.txt"
    a_file.write_text("x")
    assert main(["convert", teacher, str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "x"


def test_distill_eval_push(teacher_dir, capsys):
    run = teacher_dir / "run"
    args = ["distill", str(teacher_dir / "teacher"), str(run), "--data", str(teacher_dir / "train.txt"),
            "--block-size", "16", "--stage1-steps", "3", "--stage2-steps", "3", "--feature-map", "hedgehog",
            "--rule", "linear"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "student / teacher perplexity" in out and (run / "model" / "README.md").exists()
    assert main(args) == 2 and "not empty" in capsys.readouterr().err
    # Resuming a finished run has nothing to do (it would add a step and rewrite model/).
    assert main(args + ["--resume"]) == 2 and "has finished: its model is" in capsys.readouterr().err
    assert (run / "stage1" / "tokenizer.json").exists()  # stage 1 is a loadable model folder too
    other = teacher_dir / "other.txt"
    other.write_text(" ".join(reversed((teacher_dir / "train.txt").read_text().split())))
    assert main(["eval", str(run / "model"), "--teacher", str(teacher_dir / "teacher"), "--data",
                 str(teacher_dir / "train.txt"), str(other), "--block-size", "16", "--max-blocks", "4"]) == 0
    out = capsys.readouterr().out  # one set per file, their mean, and the greedy next-token agreement
    assert "| train.txt |" in out and "| other.txt |" in out and "| **mean** |" in out
    assert "next-token agreement" in out and "mean over 2 held-out sets" in out
    assert main(["eval", str(run / "model"), "--teacher", str(teacher_dir / "teacher")]) == 2
    assert "--offline-sets" in capsys.readouterr().err
    assert main(["push", str(run / "model"), "me/tiny-fwp", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "modeling_fwp.py", "configuration_fwp.py", "README.md",
                 "tokenizer.json", "generation_config.json"):
        assert f"  {name}\n" in listing
    assert "checkpoint" not in listing
    assert main(["push", str(run), "me/x", "--dry-run"]) == 2
    assert "not a saved model folder" in capsys.readouterr().err
    # A run folder where a model is expected names the model inside it.
    assert main(["eval", str(run), "--teacher", str(teacher_dir / "teacher"), "--data",
                 str(teacher_dir / "train.txt"), "--block-size", "16"]) == 2
    assert f"is a distill run folder, not a model: its model is {run / 'model'}" in capsys.readouterr().err
    # The run folder is checked before the teacher loads (the teacher here does not exist).
    assert main(["distill", "no-such-teacher", str(run), "--data", str(teacher_dir / "train.txt")]) == 2
    assert "not empty: resume that run (--resume)" in capsys.readouterr().err
    assert main(["distill", "no-such-teacher", str(teacher_dir / "typo"), "--data", str(teacher_dir / "train.txt"),
                 "--resume"]) == 2
    assert "nothing to resume in" in capsys.readouterr().err and not (teacher_dir / "typo").exists()
    assert main(["distill", str(teacher_dir / "teacher"), str(teacher_dir / "r2"), "--data", "nofile.txt"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--stage2-steps", "0", "--stage2-steps must be an integer >= 1"),
    ("--stage1-steps", "-1", "--stage1-steps must be an integer >= 0"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1"),
    ("--ce-weight", "-5", "--ce-weight must be a finite number >= 0"),
    ("--temperature", "0", "--temperature must be a positive finite number"),
    ("--lora-rank", "0", "--lora-rank must be an integer >= 1"),
    ("--block-size", "0", "--block-size must be an integer >= 2"),
    ("--keep-softmax", "", "--keep-softmax ''"),
])
def test_distill_checks_every_number_before_any_work(tmp_path, capsys, flag, value, message):
    # The teacher does not exist: the option must be refused before anything is loaded or written.
    run = tmp_path / "run"
    assert main(["distill", str(tmp_path / "no-teacher"), str(run), "--data", str(tmp_path / "none.txt"),
                 flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_recipe_validates_its_fields():
    from hf_fwp.conversion.recipe import Recipe, RecipeError

    for bad in (dict(stage2_steps=0), dict(keep_softmax="every:2"), dict(keep_softmax=True), dict(fwp_rule="x"),
                dict(sliding_window=0), dict(temperature=-1.0), dict(batch_size=2.5), dict(lora_targets="q_proj"),
                dict(lora_targets=()), dict(seed="x"), dict(train_fwp_in_stage2="no"), dict(temperature=float("inf")),
                dict(block_size=1), dict(fwp_options={"fwp_rule": "delta"}), dict(fwp_state_heads="value")):
        with pytest.raises(RecipeError, match=next(iter(bad))):
            Recipe(**bad)
    Recipe(keep_softmax=[0, 3], stage1_steps=0, sliding_window=None, fwp_layer_type="linear_attention")
    with pytest.raises(RecipeError, match="keep_softmax must be a list naming each layer once"):
        Recipe(keep_softmax=[1, 1])
    with pytest.warns(UserWarning, match="sliding_window 128 >= block_size 64: the softmax window covers every"):
        Recipe(block_size=64)
    # The window belongs to hybrid layers: defaulted for them, refused for a pure FWP layout.
    assert Recipe().sliding_window == 128 and Recipe(fwp_layer_type="linear_attention").sliding_window is None
    with pytest.raises(RecipeError, match="sliding_window must be None with fwp_layer_type='linear_attention'"):
        Recipe(fwp_layer_type="linear_attention", sliding_window=32)


def test_bad_data_is_a_one_line_error_and_writes_nothing(teacher_dir, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("too short\n")
    run = tmp_path / "run"
    assert main(["distill", str(teacher_dir / "teacher"), str(run), "--data", str(teacher_dir / "train.txt"),
                 "--eval-data", str(tmp_path / "short.txt"), "--block-size", "16"]) == 2
    assert "shorter than one block of 16 tokens" in capsys.readouterr().err and not run.exists()
    assert main(["eval", str(teacher_dir / "teacher"), "--teacher", str(teacher_dir / "teacher"), "--data",
                 str(teacher_dir / "train.txt"), "--max-blocks", "0"]) == 2
    assert "--max-blocks must be at least 1" in capsys.readouterr().err


def test_damaged_weights_and_missing_tokenizer_are_one_line_errors(teacher_dir, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(teacher_dir / "teacher", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["convert", str(damaged), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "the weights cannot be read" in err[0] and "damaged or incomplete" in err[0]
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(teacher_dir / "teacher", no_tok)
    for f in no_tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    assert main(["convert", str(no_tok), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("hf-fwp: error:") and "no usable tokenizer" in err[0]


def test_generate_push_and_output_mistakes_are_one_line_errors(teacher_dir, tmp_path, capsys, monkeypatch):
    model = str(teacher_dir / "teacher")
    assert main(["generate", model, "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    assert main(["generate", model, "--prompt", " "]) == 2
    assert "--prompt must not be empty" in capsys.readouterr().err
    # distill into an existing file, and into a folder that cannot be created
    a_file = tmp_path / "run.txt"
    a_file.write_text("x")
    data = ["--data", str(teacher_dir / "train.txt"), "--block-size", "16", "--stage1-steps", "1", "--stage2-steps", "1"]
    assert main(["distill", model, str(a_file), *data]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "x"
    assert main(["distill", model, str(a_file / "run"), *data]) == 2
    assert capsys.readouterr().err.count("hf-fwp: error:") == 1
    # push: a bad repo id even in a dry run; stray files stay out; no token is a clear message
    folder = tmp_path / "model"
    assert main(["convert", model, str(folder)]) == 0
    (folder / "notes.txt").write_text("private")
    assert main(["push", str(folder), "not a valid id!!", "--dry-run"]) == 2
    assert "not a valid Hub repository id" in capsys.readouterr().err
    assert main(["push", str(folder), "me/model", "--dry-run"]) == 0
    assert "notes.txt" not in capsys.readouterr().out
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["push", str(folder), "me/model"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err


def test_learned_positions_bound_the_block_size_before_any_work(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conversion.test_stage2 import _tokenizer

    tok = _tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=16)).save_pretrained(
        tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "train.txt").write_text("some text to train on\n" * 50)
    run = tmp_path / "run"
    assert main(["distill", str(tmp_path / "gpt2"), str(run), "--data", str(tmp_path / "train.txt"),
                 "--block-size", "32"]) == 2
    assert "longer than the 16 learned positions" in capsys.readouterr().err and not run.exists()
    # eval and generate check the same bound (and a converted student's learned table) before running.
    gpt2 = str(tmp_path / "gpt2")
    assert main(["convert", gpt2, str(tmp_path / "student")]) == 0
    assert main(["eval", str(tmp_path / "student"), "--teacher", gpt2, "--data", str(tmp_path / "train.txt"),
                 "--block-size", "32"]) == 2
    assert "longer than the 16 learned positions" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "student"), "--prompt", "some text", "--max-new-tokens", "40"]) == 2
    assert "learned table of 16 positions" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "student"), "--prompt", "some text", "--max-new-tokens", "4"]) == 0


def test_help_shows_defaults_and_describes_every_option(capsys):
    from hf_fwp.conversion.recipe import Recipe, named_recipe

    lengths = f"(default: the --recipe's: {Recipe().stage2_steps}; pure-fwp: {named_recipe('pure-fwp').stage2_steps})"
    for command, expected in [("distill", ["--stage2-steps STAGE2_STEPS", lengths, "--save-steps",
                                           "what --resume can recover"]),
                              ("eval", ["held-out text", "(default: 32)"]),
                              ("generate", ["(default: 40)"]), ("push", ["as private"])]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for piece in expected:
            assert piece in text, (command, piece)


def test_a_local_path_typo_is_not_retried_as_a_hub_id(teacher_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "nonexistent_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'nonexistent_dir' is neither a local path" in err and "nor a model on the Hugging Face Hub" in err
    assert main(["distill", str(teacher_dir / "teacher"), str(tmp_path / "run"), "--data", "nothere"]) == 2
    assert "'nothere' is neither a local path" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--keep-softmax", "7"], "are not layers of this 2-layer model"),
                                            (["--keep-softmax", "all"], "Every layer stayed softmax")])
def test_a_refused_layout_leaves_no_run_folder(teacher_dir, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert main(["distill", str(teacher_dir / "teacher"), str(run), "--data", str(teacher_dir / "train.txt"),
                 "--block-size", "16", *flags]) == 2
    assert message in capsys.readouterr().err and not run.exists()


def test_push_refuses_a_folder_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "me/model", "--dry-run"]) == 2
    assert "no model weights" in capsys.readouterr().err


def test_errors_name_the_argument_they_are_about(teacher_dir, tmp_path, capsys):
    missing = str(tmp_path / "missing.gguf")
    assert main(["generate", missing, "--prompt", "hi"]) == 2
    assert f"model '{missing}' does not exist" in capsys.readouterr().err
    assert main(["eval", missing, "--teacher", str(teacher_dir / "teacher"), "--data",
                 str(teacher_dir / "train.txt"), "--block-size", "16"]) == 2
    assert f"student '{missing}' does not exist" in capsys.readouterr().err


def test_push_uploads_to_a_branch_with_huggingface_hub(teacher_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:  # records what a real upload would do (no network here)
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw["private"]))

        def create_branch(self, repo_id, branch, **kw):
            calls.append(("create_branch", repo_id, branch))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], kw["revision"], sorted(kw["allow_patterns"])))

    folder = tmp_path / "model"
    assert main(["convert", str(teacher_dir / "teacher"), str(folder)]) == 0
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    assert main(["push", str(folder), "me/model", "--private", "--revision", "v1"]) == 0
    assert "uploaded to me/model (branch v1)" in capsys.readouterr().out
    assert ("create_repo", "me/model", True) in calls and ("create_branch", "me/model", "v1") in calls
    upload = next(c for c in calls if c[0] == "upload")
    assert upload[1:3] == ("me/model", "v1") and "model.safetensors" in upload[3] and "config.json" in upload[3]


def test_new_user_pass_findings(teacher_dir, tmp_path, capsys, monkeypatch):
    teacher = str(teacher_dir / "teacher")
    # A bad --keep-softmax is one line for convert as for distill.
    assert main(["convert", teacher, str(tmp_path / "c"), "--keep-softmax", "every:0"]) == 2
    assert "--keep-softmax" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert main(["convert", teacher, str(tmp_path / "c"), "--keep-softmax", "all", "--window", "8"]) == 2
    assert "with --keep-softmax all there are none" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["convert", teacher, ".", "--overwrite"]) == 2
    assert "the folder you are in" in capsys.readouterr().err and not list(tmp_path.glob(".*tmp-*"))
    # eval checks its options before loading anything.
    assert main(["eval", teacher, "--teacher", teacher, "--data", str(teacher_dir / "train.txt"), "--prompt", ""]) == 2
    assert "--prompt must not be empty" in capsys.readouterr().err
    assert main(["eval", teacher, "--teacher", teacher, "--offline-sets", "--block-size", "1"]) == 2
    assert "--block-size must be at least 2" in capsys.readouterr().err
    # Every file is its own set: --data and --eval-data both count, same-named files stay apart.
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "set.txt").write_text((teacher_dir / "train.txt").read_text())
    assert main(["eval", teacher, "--teacher", teacher, "--data", str(tmp_path / "a" / "set.txt"), "--eval-data",
                 str(tmp_path / "b" / "set.txt"), "--block-size", "16", "--max-blocks", "2"]) == 0
    out = capsys.readouterr().out
    assert f"| {tmp_path / 'a' / 'set.txt'} |" in out and f"| {tmp_path / 'b' / 'set.txt'} |" in out
    # Held-out text that is also training text is refused.
    assert main(["distill", teacher, str(tmp_path / "r"), "--data", str(teacher_dir / "train.txt"), "--eval-data",
                 str(teacher_dir / "train.txt")]) == 2
    assert "never be trained on" in capsys.readouterr().err
    # Folders get the usual permissions, and push publishes the model's files only.
    folder = tmp_path / "model"
    assert main(["convert", teacher, str(folder)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    (folder / "credentials.json").write_text("{}")
    (folder / "my_script.py").write_text("print(1)\n")
    capsys.readouterr()
    assert main(["push", str(folder), "me/model", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "credentials.json" not in listing and "my_script.py" not in listing
    assert "  ops_step_triton.py\n" in listing and "  config.json\n" in listing


def test_second_new_user_pass_findings(teacher_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    teacher = str(teacher_dir / "teacher")
    # Converting into the teacher's own folder (or one holding it) would delete the model being read.
    shutil.copytree(teacher, tmp_path / "nest" / "teach")
    for out in ("nest/teach", "nest"):
        assert main(["convert", str(tmp_path / "nest" / "teach"), str(tmp_path / out), "--overwrite"]) == 2
        assert "is the teacher's folder (or holds it)" in capsys.readouterr().err
    assert '"model_type": "llama"' in (tmp_path / "nest" / "teach" / "config.json").read_text()
    # A teacher missing a weight (transformers would initialise it at random) or holding NaN is refused.
    broken = tmp_path / "broken"
    shutil.copytree(teacher, broken)
    weights = load_file(broken / "model.safetensors")
    weights.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(broken), str(tmp_path / "s1")]) == 2
    assert "lacks 1 weight(s) its config needs (model.layers.0.self_attn.q_proj.weight)" in capsys.readouterr().err
    weights = load_file(teacher_dir / "teacher" / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(broken), str(tmp_path / "s1")]) == 2
    assert "NaN or inf weights in 1 tensor(s) (model.norm.weight)" in capsys.readouterr().err
    # Weights of another shape than the config's: one line, not a traceback.
    config = (broken / "config.json").read_text()
    (broken / "config.json").write_text(config.replace('"intermediate_size": 48', '"intermediate_size": 40'))
    assert main(["generate", str(broken), "--prompt", "hi"]) == 2
    assert "weights do not have the shapes its config.json gives" in capsys.readouterr().err
    assert not (tmp_path / "s1").exists()
    # eval refuses a student of another vocabulary.
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(small)
    assert main(["eval", str(small), "--teacher", teacher, "--data", str(teacher_dir / "train.txt"),
                 "--block-size", "16"]) == 2
    assert "different vocabularies" in capsys.readouterr().err
    # Duplicated layers in --keep-softmax, a bad branch name and the user's own files are refused / left out.
    for keep in ("every:1", "0,1"):  # every layer of the 2-layer teacher: the layout flags would do nothing
        assert main(["convert", teacher, str(tmp_path / "s2"), "--keep-softmax", keep, "--window", "8"]) == 2
        assert "keeps all 2 layers of this teacher softmax, so --window would have no effect" in capsys.readouterr().err
    assert main(["convert", teacher, str(tmp_path / "s2"), "--keep-softmax", "0,0"]) == 2
    assert "--keep-softmax must be a list naming each layer once" in capsys.readouterr().err
    folder = tmp_path / "s3"
    assert main(["convert", teacher, str(folder)]) == 0
    (folder / "screenshot.png").write_bytes(b"png")
    (folder / "layers_mine.py").write_text("x = 1\n")
    capsys.readouterr()
    assert main(["push", str(folder), "me/model", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "screenshot.png" not in listing and "layers_mine.py" not in listing and "  layers_conv.py\n" in listing
    assert main(["push", str(folder), "me/model", "--dry-run", "--revision", "bad..branch"]) == 2
    assert "not a valid branch name" in capsys.readouterr().err


def test_distill_takes_the_named_recipes_training_lengths_unless_given(teacher_dir, monkeypatch):
    from hf_fwp.conversion import pipeline
    from hf_fwp.conversion.recipe import Recipe, named_recipe

    recipes = []

    class Stop(Exception):
        pass

    def record(teacher, tokenizer, train, held, recipe, *args, **kwargs):
        recipes.append(recipe)
        raise Stop

    monkeypatch.setattr(pipeline, "run", record)
    base = ["distill", str(teacher_dir / "teacher"), None, "--data", str(teacher_dir / "train.txt"), "--block-size",
            "16"]
    for i, extra in enumerate([[], ["--recipe", "pure-fwp"], ["--recipe", "pure-fwp", "--stage1-steps", "7"]]):
        with pytest.raises(Stop):
            main(base[:2] + [str(teacher_dir / f"lengths{i}")] + base[3:] + extra)
    pure = named_recipe("pure-fwp")
    assert pure.stage1_steps > pure.stage2_steps  # pure-fwp spends its budget mostly on stage 1
    assert [(r.stage1_steps, r.stage2_steps) for r in recipes] == [
        (Recipe().stage1_steps, Recipe().stage2_steps), (pure.stage1_steps, pure.stage2_steps),
        (7, pure.stage2_steps)]
