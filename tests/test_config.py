"""One precedence rule: defaults < --config < --set < typed flags; unknown keys are errors."""

import dataclasses

import pytest

from alpaca_cli import config as cfgmod
from alpaca_cli.train_config import TrainConfig, adapt_tutorial_yaml
from alpaca_cli.errors import ConfigError

TUTORIAL_YAML = """\
# cf https://github.com/tatsu-lab/stanford_alpaca#fine-tuning
model_name_or_path: NousResearch/Llama-2-7b-hf
trainer:
  mp: p=f32,c=bfloat16
  wandb:
    project: "levanter-alpaca"
    tags: ["llama2"]
  num_train_steps: 1218  # 128 * 1218 = 155904, which is almost but not quite 3 epochs, which is what alpaca did
  train_batch_size: 128

  # if using model parallelism, this is useful:
  tensor_parallel_axes: ["mlp", "heads"]
optimizer:
  learning_rate: 2e-5
  weight_decay: 0.0
prompts:
  # |- means multiline string, keeping all but the final newline
  prompt_input: |-
    Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
  prompt_no_input: |-
    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Response:
"""


def test_train_defaults_are_stanfords_recipe():
    c = cfgmod.load_config(TrainConfig)
    assert c.model_name_or_path == "meta-llama/Llama-2-7b-hf"
    assert c.batch_size == 128 and c.epochs == 3 and c.steps is None and c.seq_len == 2048 and c.pack
    o = c.optimizer
    assert (o.learning_rate, o.weight_decay, o.warmup, o.min_lr_ratio, o.lr_schedule) == (2e-5, 0.0, 0.03, 0.0, "cosine")
    assert (o.beta1, o.beta2, o.epsilon, o.max_grad_norm) == (0.9, 0.999, 1e-8, 1.0)
    import numpy as np

    assert np.dtype(c.trainer.mp.param_dtype) == np.float32 and np.dtype(c.trainer.mp.compute_dtype).name == "bfloat16"
    p = cfgmod.load_config(cfgmod.PrepareConfig)
    assert (p.data, p.max_length, p.on_overflow, p.mask_inputs) == ("tatsu-lab/alpaca", 512, "truncate", True)


def test_precedence_file_then_set_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  learning_rate: 1.0e-5\n  beta2: 0.95\nseq_len: 1024\nepochs: 2\n")
    c = cfgmod.load_config(TrainConfig, str(path), ["optimizer.beta2=0.98", "seq_len=512"], {"seq_len": 256, "epochs": None})
    assert c.optimizer.learning_rate == 1e-5  # file
    assert c.optimizer.beta2 == 0.98  # --set beats file
    assert c.seq_len == 256  # flag beats --set
    assert c.epochs == 2  # a flag left unset (None) does not override the file
    assert c.optimizer.weight_decay == 0.0  # untouched recipe default survives a partial optimizer block


def test_lora_changes_the_default_learning_rate_and_only_the_default(tmp_path):
    from alpaca_cli.train_config import derived_defaults

    def lr(config=None, sets=(), flags=None):
        return cfgmod.load_config(TrainConfig, config, list(sets), flags or {}, derived_defaults=derived_defaults
                                  ).optimizer.learning_rate

    assert lr() == lr(flags={"lora_r": 0}) == 2e-5  # full fine-tuning: Stanford's
    file = tmp_path / "lora.yaml"
    file.write_text("lora_r: 8\n")
    # LoRA given by a flag, --set or a file: adapters starting at zero need a larger rate
    assert lr(flags={"lora_r": 16}) == lr(sets=["lora_r=16"]) == lr(str(file)) == cfgmod.LORA_LEARNING_RATE == 2e-4
    # a rate given anywhere still wins over the derived default
    file.write_text("lora_r: 8\noptimizer:\n  learning_rate: 1.0e-4\n")
    assert lr(str(file)) == 1e-4
    assert lr(sets=["optimizer.learning_rate=3e-4"], flags={"lora_r": 16}) == 3e-4
    assert lr(flags={"lora_r": 16, "optimizer.learning_rate": 5e-5}) == 5e-5


def test_tutorial_alpaca_yaml_works_as_it_is(tmp_path):
    path = tmp_path / "alpaca-llama2.yaml"
    path.write_text(TUTORIAL_YAML)
    c = cfgmod.load_config(TrainConfig, str(path), file_adapter=adapt_tutorial_yaml)
    assert c.model_name_or_path == "NousResearch/Llama-2-7b-hf"
    assert c.steps == 1218 and c.batch_size == 128 and c.wandb_project == "levanter-alpaca"
    assert c.prompts.prompt_no_input == cfgmod.STANFORD_PROMPT_NO_INPUT
    assert c.prompts.prompt_input == cfgmod.STANFORD_PROMPT_INPUT


@pytest.mark.parametrize(
    "sets,message",
    [
        (["trainer.nope=1"], r"unknown config key: .*nope"),
        (["nope=1"], r"unknown config key: .*nope"),
        (["seq_len=4"], r"seq_len \(--seq-len\) must be at least 8"),
        (["optimizer.learning_rate=.nan"], r"optimizer.learning_rate \(--learning-rate\) must be a finite number"),
        (["optimizer.learning_rate=-1e-5"], r"learning_rate .*must be a finite number >= 0.0, got -1e-05"),
        (["optimizer.learning_rate=0"], r"learning_rate \(--learning-rate\) is 0"),
        (["attention=fast"], r"attention \(--attention\) must be one of auto, flash, splash, vanilla"),
        (["keep_checkpoints=-1"], r"keep_checkpoints \(--keep-checkpoints\) must be >= 0"),
        (["trainer.id=x"], "trainer.id is set by alpaca"),
        (["val_fraction=0.1", "val_data=x.jsonl"], "val_fraction or val_data, not both"),
        (["novalue"], "not of the form key=value"),
    ],
)
def test_bad_train_config_is_one_clear_error(sets, message):
    with pytest.raises(ConfigError, match=message):
        cfgmod.load_config(TrainConfig, None, sets)


def test_set_of_a_whole_section_is_refused_rather_than_reset_to_its_defaults():
    """`--set trainer=5` (meaning trainer.seed) would replace the trainer section with Levanter's defaults (compute
    in float32 instead of the recipe's bfloat16, say) once a flag such as --batch-size writes into it."""
    with pytest.raises(ConfigError) as e:
        cfgmod.load_config(TrainConfig, None, ["trainer=5"], {"trainer.train_batch_size": 16})
    assert str(e.value) == ("--set trainer=5: `trainer` is a section of settings, not one value; set a key in it, "
                            "e.g. --set trainer.seed=5")
    with pytest.raises(ConfigError, match=r"`prompts` is a section .* e.g. --set prompts.prompt_input=x"):
        cfgmod.load_config(cfgmod.PrepareConfig, None, ["prompts=x"])
    merged = cfgmod.load_config(TrainConfig, None, ["trainer={seed: 5}"], {"trainer.train_batch_size": 16})
    assert (merged.trainer.seed, merged.trainer.train_batch_size) == (5, 16)  # a mapping merges, as in a file
    assert merged.trainer.mp == TrainConfig().trainer.mp


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        cfgmod.load_config(cfgmod.PrepareConfig, str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfgmod.load_config(cfgmod.PrepareConfig, str(bad))
    bad.write_text("max_length: 1\non_overflow: cut\n")
    with pytest.raises(ConfigError) as e:
        cfgmod.load_config(cfgmod.PrepareConfig, str(bad))
    assert len(e.value.problems) == 2  # every problem reported at once


def test_resolved_config_dumps_and_reloads(tmp_path):
    c = cfgmod.load_config(TrainConfig, None, ["optimizer.learning_rate=3e-4", "seq_len=512"])
    path = tmp_path / "train.yaml"
    path.write_text(cfgmod.dump(c))
    again = cfgmod.load_config(TrainConfig, str(path))
    assert cfgmod.encode(again) == cfgmod.encode(c)


def test_help_defaults_are_the_configs_defaults():
    """Help texts read defaults from config.py (cheap to import); TrainConfig builds Levanter's parts from the
    same tables. Every flag's advertised default is the value a run gets."""
    import dataclasses

    import draccus

    from alpaca_cli.config import TrainOptions, default_value

    resolved = draccus.encode(cfgmod.load_config(TrainConfig))
    keys = [f.name for f in dataclasses.fields(TrainOptions)]
    keys += [f"trainer.{k}" for k in cfgmod.RECIPE_TRAINER] + [f"optimizer.{k}" for k in cfgmod.RECIPE_OPTIMIZER]
    for key in keys:
        node = resolved
        for part in key.split("."):
            node = node[part]
        expected = default_value(TrainOptions, key)
        if key == "trainer.mp":  # the policy's string form, resolved
            import jmp

            assert str(jmp.get_policy(expected)) == str(cfgmod.load_config(TrainConfig).trainer.mp)
            continue
        assert node == (draccus.encode(expected) if dataclasses.is_dataclass(expected) else expected), key


def test_help_shows_the_defaults():
    from typer.testing import CliRunner

    from alpaca_cli.main import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).stdout
    assert "Peak learning rate (with --lora-r: 2e-4). Default: 2e-05. Config key: optimizer.learning_rate." in out
    assert "Default: 3.0. Config key: epochs." in out
    prep = CliRunner().invoke(app, ["prepare", "--help"], env={"COLUMNS": "300"}).stdout
    assert "Default: 512. Config key: max_length." in prep


class _Stopped(Exception):
    pass


def resolved(monkeypatch, args: list[str]):
    """The config an `alpaca` command resolves from its arguments, stopped before any work (no model, no JAX)."""
    from typer.testing import CliRunner

    from alpaca_cli import distributed
    from alpaca_cli.main import app

    seen, load = [], cfgmod.load_config
    monkeypatch.setattr(cfgmod, "load_config", lambda *a, **k: seen.append(load(*a, **k)) or seen[-1])

    def stop(*a, **k):
        raise _Stopped

    monkeypatch.setattr(distributed, "initialize", stop)
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, _Stopped), result.output
    return seen[-1]


def test_generate_and_eval_resolve_defaults_then_config_then_set_then_flags(tmp_path, monkeypatch):
    file = tmp_path / "decoding.yaml"
    file.write_text("temperature: 0.5\ntop_p: 0.8\nseed: 4\nmax_new_tokens: 100\nbatch_size: 3\n")
    gen = resolved(monkeypatch, ["generate", "Hi.", "--from-export", "x", "--config", str(file),
                                 "--set", "top_p=0.9", "--set", "seed=5", "--seed", "6"])
    assert (gen.temperature, gen.top_p, gen.seed, gen.max_new_tokens) == (0.5, 0.9, 6, 100)  # file, set, flag, file
    assert gen.batch_size == 3
    plain = resolved(monkeypatch, ["generate", "Hi.", "--from-export", "x"])
    assert cfgmod.encode(plain) == cfgmod.encode(cfgmod.GenerateConfig())
    # AlpacaEval's decoding replaces the defaults and loses, like them, to what is given beside it
    preset = resolved(monkeypatch, ["generate", "Hi.", "--from-export", "x", "--alpaca-eval", "--set", "top_p=0.5"])
    assert (preset.temperature, preset.top_p, preset.max_new_tokens) == (0.7, 0.5, 2048)

    scoring = tmp_path / "scoring.yaml"
    scoring.write_text("max_new_tokens: 100\nbatch_size: 3\n")
    evaluate = ["eval", "--data", "d.jsonl", "--from-export", "x", "-c", str(scoring)]
    scored = resolved(monkeypatch, evaluate)
    assert (scored.max_new_tokens, scored.batch_size) == (100, 3)
    scored = resolved(monkeypatch, [*evaluate, "--set", "batch_size=4", "--set", "max_new_tokens=60",
                                    "--max-new-tokens", "50"])
    assert (scored.max_new_tokens, scored.batch_size) == (50, 4)
    assert cfgmod.encode(resolved(monkeypatch, ["eval", "--data", "d.jsonl", "--from-export", "x"])) == {
        "max_new_tokens": 256, "batch_size": 8}


def test_generate_and_eval_refuse_bad_settings_naming_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^--max-new-tokens and --batch-size must be at least 1$"):
        cfgmod.load_config(cfgmod.EvalConfig, None, ["batch_size=0"])
    with pytest.raises(ConfigError, match=r"--top-p must be in \(0, 1\], got 1.5"):
        cfgmod.load_config(cfgmod.GenerateConfig, None, ["top_p=1.5"])
    with pytest.raises(ConfigError, match="unknown config key"):
        cfgmod.load_config(cfgmod.EvalConfig, None, ["temperature=1"])


@dataclasses.dataclass
class Toy:
    width: int = 7
    """How wide the toy is."""
    fancy: bool = True
    """Whether the toy is fancy."""
    extra_depth: float = 0.0
    """Not a flag."""


def test_a_flags_help_type_and_name_come_from_the_config_field():
    """The table names keys only: the option's type, its help (the field's docstring), its default and the flag
    spelling in messages are derived; a key without a flag is named by itself."""
    import typer
    from typer.testing import CliRunner

    from alpaca_cli.options import config_options

    table = cfgmod.Flags(Toy, "width", cfgmod.Flag("fancy", "--shiny"), set_example="width=3")
    got = {}

    @config_options(table)
    def toy(settings: cfgmod.Settings = None):
        got["config"] = settings.resolve(Toy)

    app = typer.Typer()
    app.command()(toy)
    help_out = " ".join(CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300"}).stdout.split())
    assert "How wide the toy is. Default: 7. Config key: width." in help_out
    assert "--shiny --no-shiny" in help_out and "Whether the toy is fancy. Default: on. Config key: fancy." in help_out
    assert "e.g. --set width=3" in help_out and "--extra-depth" not in help_out
    assert CliRunner().invoke(app, ["--width", "wide"]).exit_code == 2  # typed as the field is
    assert CliRunner().invoke(app, ["--width", "9", "--no-shiny", "--set", "extra_depth=2"]).exit_code == 0
    assert got["config"] == Toy(width=9, fancy=False, extra_depth=2.0)
    assert (table.named("width"), table.named("fancy"), table.named("extra_depth")) == (
        "width (--width)", "fancy (--shiny)", "extra_depth")


@pytest.mark.parametrize("command", ["prepare", "train", "export", "generate", "eval"])
def test_every_flags_help_shows_its_config_default(command):
    """Each table's flags, in every command's --help, with the default of the config field (or recipe) it sets."""
    from typer.testing import CliRunner

    from alpaca_cli.main import app

    table = {"prepare": cfgmod.PREPARE_FLAGS, "train": cfgmod.TRAIN_FLAGS, "export": cfgmod.EXPORT_FLAGS,
             "generate": cfgmod.GENERATE_FLAGS, "eval": cfgmod.EVAL_FLAGS}[command]
    out = " ".join(CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}).stdout.split())
    for f in table:
        assert f.flag in out, f.flag
        default = cfgmod.default_value(table.cls, f.key)
        if f.show_default and default not in (None, False):
            shown = "on" if default is True else ",".join(default) if isinstance(default, list) else default
            assert f"Default: {shown}. Config key: {f.key}." in out, f.key
