"""The end-to-end recipe on a tiny teacher: output folder, model card, reload, and resuming an interrupted run."""

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_fwp.conversion import evaluate, pipeline
from hf_fwp.conversion.data import pack
from hf_fwp.conversion.trainer import DistillationTrainer
from tests.conversion.test_stage2 import TEXT, _tokenizer
from tests.modeling.helpers import load_in_fresh_process, run_isolated


def _setup():
    torch.manual_seed(0)
    tok = _tokenizer()
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           initializer_range=0.2)).eval()
    blocks = pack(Dataset.from_dict({"text": TEXT.splitlines()}), tok, block_size=16)
    split = blocks.train_test_split(test_size=0.25, seed=0)
    recipe = pipeline.Recipe(fwp_rule="linear", feature_map="hedgehog", sliding_window=8, block_size=16, batch_size=4,
                             stage1_steps=5, stage2_steps=6, save_steps=3, lora_rank=4)
    return tok, teacher, split["train"], split["test"], recipe


class Interrupted(Exception):
    pass


def test_pipeline_writes_a_loadable_folder_and_resumes(tmp_path, monkeypatch):
    tok, teacher, train, held_out, recipe = _setup()
    reference = pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "ref", progress=False,
                             base_model="tiny-llama", license="apache-2.0")
    folder = tmp_path / "ref" / "model"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_fwp.py", "tokenizer.json", "README.md",
            "generation_config.json", "results.json"} <= names
    card = (folder / "README.md").read_text()
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data.to_dict()  # the Hub's parser reads the YAML header
    assert meta["base_model"] == "tiny-llama" and meta["license"] == "apache-2.0"
    assert "student / teacher perplexity" in card
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"][:2] == ["fwp", "hf-fwp"]
    assert "feature map `hedgehog`; layers: 2 x `hybrid_sliding`, window 8" in card  # from the saved config
    assert reference["tokens_seen"] == (5 + 6) * 4 * 16
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(held_out["input_ids"][:2])
    with torch.no_grad():
        ref_logits = loaded(ids).logits
    # The distilled folder is self-describing: a fresh process loads it as remote code, tokenizer included.
    fresh = load_in_fresh_process(folder, ids, ids[:1, :5])
    torch.testing.assert_close(fresh["logits"], ref_logits, atol=1e-6, rtol=1e-5)
    assert fresh["gen"] == loaded.generate(ids[:1, :5], max_new_tokens=4, do_sample=False).tolist()
    assert fresh["tokenizer"] is not None and fresh["pipeline_text"].startswith("Hello")
    # The card's usage snippet runs as printed, without hf-fwp.
    snippet = card.split("```python\n")[1].split("```")[0]
    assert 'model_id = "path/to/this/folder"' in snippet and "hf_fwp" not in snippet
    out = run_isolated(snippet.replace("path/to/this/folder", str(folder)), tmp_path)
    assert out.stdout.strip()

    # Interrupt stage 2 after its first checkpoint (step 3), then resume.
    calls = {"n": 0}
    original = DistillationTrainer.compute_loss

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Interrupted
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "compute_loss", flaky)
    with pytest.raises(Interrupted):
        pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "stage2" / "checkpoint-3").exists()
    with pytest.raises(ValueError, match="not empty"):
        pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "run", progress=False)
    monkeypatch.setattr(DistillationTrainer, "compute_loss", original)
    # Resuming with other options would continue the stored model under a card describing another one.
    from dataclasses import replace

    with pytest.raises(ValueError, match="different recipe .*feature_map: 'hedgehog' -> 't2r'"):
        pipeline.run(teacher, tok, train, held_out, replace(recipe, feature_map="t2r"), tmp_path / "run",
                     resume=True, progress=False)
    # ... and so would resuming with another teacher or other training text.
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match="started with another teacher"):
        pipeline.run(other, tok, train, held_out, recipe, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ValueError, match="started with other training text"):
        pipeline.run(teacher, tok, train.select(range(len(train) - 4)), held_out, recipe, tmp_path / "run",
                     resume=True, progress=False)
    # Resuming a folder that holds no run is a mistyped path, not a new run.
    with pytest.raises(ValueError, match="nothing to resume in"):
        pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "typo", resume=True, progress=False)
    assert not (tmp_path / "typo").exists()
    # A newer checkpoint cut short while saving (no FWP weights beside the adapters) must not be resumed from.
    import shutil

    from hf_fwp.conversion.trainer import EXTRA_WEIGHTS

    torn = tmp_path / "run" / "stage2" / "checkpoint-4"
    shutil.copytree(tmp_path / "run" / "stage2" / "checkpoint-3", torn)
    (torn / EXTRA_WEIGHTS).unlink()
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*checkpoint-4"):
        pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "run", resume=True, progress=False)
    state = json.loads((tmp_path / "run" / "stage2" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    # Resuming restores optimizer, scheduler and RNG states: the result equals the uninterrupted run.
    torch.testing.assert_close(resumed(ids).logits, ref_logits, atol=1e-5, rtol=1e-4)


def test_blocks_that_do_not_fit_the_recipe_and_unknown_lora_targets_are_refused_before_any_write(tmp_path):
    from dataclasses import replace

    tok, teacher, train, held_out, recipe = _setup()
    with pytest.raises(ValueError, match="blocks hold 16 tokens but the recipe's block_size is 32"):
        pipeline.run(teacher, tok, train, held_out, replace(recipe, block_size=32), tmp_path / "a", progress=False)
    # Held-out blocks may have another length than the training blocks, but not beyond learned positions.
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=16)).eval()
    long_held = pack(Dataset.from_dict({"text": TEXT.splitlines()}), tok, block_size=32)
    with pytest.raises(ValueError, match="'long' has blocks of 32 tokens, more than the 16 positions"):
        pipeline.run(gpt2, tok, train, {"long": long_held}, recipe, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match=r"lora_targets \['nope'\] name no module"):
        pipeline.run(teacher, tok, train, held_out, replace(recipe, lora_targets=("q_proj", "nope")), tmp_path / "b",
                     progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_checks_what_it_is_given_and_never_saves_a_diverged_student(tmp_path, monkeypatch):
    tok, teacher, train, held_out, recipe = _setup()
    for bad, message in ((dict(eval_blocks={}), "eval_blocks is empty"),
                         (dict(eval_blocks=held_out.select([])), "must be a non-empty datasets.Dataset"),
                         (dict(train_blocks=train["input_ids"]), "train_blocks must be a datasets.Dataset"),
                         (dict(prompts=[""]), "prompts must be a list of non-empty strings")):
        kwargs = dict(teacher=teacher, tokenizer=tok, train_blocks=train, eval_blocks=held_out, recipe=recipe,
                      output_dir=tmp_path / "r", progress=False)
        with pytest.raises(ValueError, match=message):
            pipeline.run(**{**kwargs, **bad})
        assert not (tmp_path / "r").exists()
    original = pipeline.attention_transfer

    def diverging(student, *args, **kwargs):  # what a too-large learning rate does, made deterministic
        result = original(student, *args, **kwargs)
        with torch.no_grad():
            next(p for n, p in student.named_parameters() if "mix_logit" in n).fill_(float("nan"))
        return result

    monkeypatch.setattr(pipeline, "attention_transfer", diverging)
    with pytest.raises(ValueError, match=r"stage 1 \(attention transfer, lr 0.01\) diverged: 1 weight tensor"):
        pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "stage1").exists()
    # Resuming a run recorded by another fingerprint format warns instead of refusing a teacher it cannot compare.
    inputs = json.loads((tmp_path / "d" / "inputs.json").read_text())
    (tmp_path / "d" / "inputs.json").write_text(json.dumps({**inputs, "format": 0, "teacher": "x"}))
    with pytest.warns(UserWarning, match="another version of hf-fwp"), \
            pytest.raises(ValueError, match="stage 1 .* diverged"):
        pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "d", resume=True, progress=False)
    # Wall time adds up over the sessions of a run.
    assert json.loads((tmp_path / "d" / "minutes.json").read_text())["minutes"] > 0


def test_the_card_writes_only_valid_metadata(tmp_path):
    from huggingface_hub import ModelCard

    tok, teacher, train, held_out, recipe = _setup()
    student = pipeline.convert(teacher, **recipe.convert_options())
    config = student.config
    result = {"recipe": pipeline.asdict(recipe), "tokens_seen": 1, "minutes": 0.1, "transfer": {"table": ""},
              "sets": {}, "ratio": 1.0, "agreement": 1.0, "prompts": [],
              "teacher": {"perplexity": 1.0, "samples": [], "tokens_per_s": 1.0},
              "student": {"perplexity": 1.0, "samples": [], "tokens_per_s": 1.0}}
    card = pipeline.model_card(result, None, config, "mit\nfoo: bar")
    meta = ModelCard(card).data.to_dict()
    assert "base_model" not in meta and "license" not in meta and "foo" not in meta
    assert "# linear student of a softmax transformer" in card
    card = pipeline.model_card(result, "a\nb: c", config, {"license": "other", "license_name": "acme-1",
                                                           "license_link": "https://acme.example/license"})
    meta = ModelCard(card).data.to_dict()
    assert meta["license"] == "other" and meta["license_name"] == "acme-1" and "b" not in meta
    assert "# linear student of a b: c\n" in card
    # The teacher's licence file travels with the student.
    (tmp_path / "LICENSE.md").write_text("Acme terms\n")
    pipeline.save_final(student, tok, tmp_path / "model", result, "me/teacher",
                        {"license": "other", "license_name": "acme-1", "license_file": str(tmp_path / "LICENSE.md")})
    assert (tmp_path / "model" / "LICENSE.md").read_text() == "Acme terms\n"
    assert "license_file" not in ModelCard.load(tmp_path / "model" / "README.md").data.to_dict()


def test_bf16_mixed_precision_trains_a_float32_student(tmp_path):
    from dataclasses import replace

    # The bf16 path on the CPU (autocast): the teacher runs in bf16, the student trains and is saved in float32.
    tok, teacher, train, held_out, recipe = _setup()
    recipe = replace(recipe, precision="bf16", gradient_checkpointing=True, stage1_steps=2, stage2_steps=2)
    result = pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "run", progress=False)
    assert teacher.dtype == torch.bfloat16 and math.isfinite(result["ratio"]) and result["ratio"] < 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").dtype == torch.float32



def test_held_out_sets_may_be_longer_than_the_training_blocks(tmp_path):
    from dataclasses import replace

    tok, teacher, train, held_out, recipe = _setup()
    long_held = pack(Dataset.from_dict({"text": TEXT.splitlines()}), tok, block_size=32)
    result = pipeline.run(teacher, tok, train, {"short": held_out, "long": long_held},
                          replace(recipe, stage1_steps=1, stage2_steps=1), tmp_path / "run", progress=False)
    assert set(result["sets"]) == {"short", "long"}
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    expected = evaluate.score_pair(teacher, student, long_held)
    assert result["sets"]["long"]["ratio"] == pytest.approx(expected["ratio"], rel=1e-5)


def test_decay_from_teacher_starts_the_decays_at_the_teachers_spans(tmp_path, monkeypatch):
    from dataclasses import replace

    from hf_fwp.conversion import distill

    with pytest.raises(pipeline.RecipeError, match="decay_from_teacher must be False with fwp_rule='linear'"):
        pipeline.Recipe(decay_from_teacher=True)
    tok, teacher, train, held_out, recipe = _setup()
    recipe = replace(recipe, fwp_rule="gated_linear", decay_from_teacher=True, stage1_steps=1, stage2_steps=1)
    reach = {}

    def spy(student, spans):  # the decays stage 1 starts from, as mean distances gamma / (1 - gamma)
        changed = distill.match_decays(student, spans)
        for i in changed:
            attn = student.model.layers[i].self_attn
            gamma = torch.exp(-attn.A_log.exp() * torch.nn.functional.softplus(attn.dt_bias)).detach()
            reach[i] = gamma / (1 - gamma)
        return changed

    monkeypatch.setattr(pipeline, "match_decays", spy)
    result = pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "run", progress=False)
    spans = result["transfer"]["teacher_spans"]  # recorded with the run, rounded to 0.01 token
    assert set(reach) == {0, 1} and set(spans) == {0, 1}
    for i in (0, 1):
        # One state per key/value head: it starts at the mean span of its two query heads.
        torch.testing.assert_close(reach[i], torch.tensor(spans[i]).view(2, 2).mean(-1), rtol=0, atol=0.01)


def test_a_run_trains_stage_1_on_the_recipes_objective(tmp_path, monkeypatch):
    from dataclasses import replace

    tok, teacher, train, held_out, recipe = _setup()
    recipe = replace(recipe, fwp_layer_type="linear_attention", sliding_window=None, fwp_rule="gated_linear",
                     stage1_objective="attention", stage1_steps=2, stage2_steps=1)
    seen, original = [], pipeline.attention_transfer

    def spy(*args, **kwargs):
        seen.append(kwargs["objective"])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "attention_transfer", spy)
    result = pipeline.run(teacher, tok, train, held_out, recipe, tmp_path / "run", progress=False)
    assert seen == ["attention"] and result["recipe"]["stage1_objective"] == "attention"
    assert len(result["transfer"]["before"]) == 2
