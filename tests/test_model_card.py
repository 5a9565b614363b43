"""The export's model card, rendered from the run's records (no model needed): the Hub metadata huggingface_hub
reads back, how it was trained, --verify's and `alpaca eval`'s figures, and how to prompt it."""

from __future__ import annotations

from huggingface_hub import ModelCard

from alpaca_cli.config import PrepareConfig
from alpaca_cli.core.model_card import write_model_card
from alpaca_cli.records import (COMPLETE, DataSource, EvalRecord, EvalScore, ExportSummary, LoraRecord,
                                OptimizerSummary, PlanRecord, PrepareInputs, PrepareRecord, PrepareSummary,
                                TrainInputs, TrainRecord, TrainSummary)
from alpaca_cli.rundir import Manifest, RunDir


def run_dir(tmp_path, *, lora=None, scores=()) -> RunDir:
    prepare = PrepareRecord(
        status=COMPLETE, config=PrepareConfig(data="tatsu-lab/alpaca"), fingerprint="f00d",
        inputs=PrepareInputs(data=DataSource(kind="hub", id="tatsu-lab/alpaca", revision="abc", split="train")),
        summary=PrepareSummary(records_read=52002, examples=52002, added_tokens={"pad_token": "[PAD]"}))
    train = TrainRecord(
        status=COMPLETE, inputs=TrainInputs(model="meta-llama/Llama-2-7b-hf"), lora=lora,
        plan=PlanRecord(steps=1218, batch_size_examples=128, epochs=3.0, seq_len=512, precision="p=f32,c=bfloat16",
                        optimizer=OptimizerSummary(learning_rate=2e-5, warmup=0.03, lr_schedule="cosine")),
        summary=TrainSummary(steps=1218, final_loss=0.98765))
    stages = {"prepare": prepare, "train": train}
    if scores:
        stages["eval"] = EvalRecord(status=COMPLETE, data="/data/held_out.jsonl", scores=list(scores))
    run = tmp_path / "llama2-alpaca"
    run.mkdir()
    return RunDir(str(run), manifest=Manifest(stages=stages))


VERIFIED = ExportSummary(weight_bytes=1, verify_max_abs_diff=3.1e-5, verify_tolerance=1e-4, verify_examples=4,
                         verify_tokens=321, verify_loss=1.23456, verify_levanter_loss=1.23457,
                         verify_eos_stop_rate=0.75, verify_eos_stopped=3, verify_eos_max_new_tokens=256)


def test_the_merged_models_card(tmp_path):
    score = EvalScore(model="step-1217", examples=100, loss=1.5, perplexity=4.4817, eos_stop_rate=0.97,
                      max_new_tokens=256)
    run = run_dir(tmp_path, scores=[score])
    write_model_card(run, str(tmp_path), step=1217, dtype="bfloat16", summary=VERIFIED)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict() == {
        "base_model": "meta-llama/Llama-2-7b-hf", "datasets": ["tatsu-lab/alpaca"], "library_name": "transformers",
        "pipeline_tag": "text-generation", "tags": ["alpaca", "instruction-tuning", "levanter"]}
    text = card.text
    assert text.startswith("\n# llama2-alpaca\n")
    assert "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:" in text
    assert "- Final training loss: 0.9877\n- Checkpoint: `step-1217`, exported as bfloat16\n" in text
    assert "1218 steps of 128 examples (3.0 epochs), AdamW lr 2e-05" in text
    assert ("transformers' logits on 4 prepared examples equal Levanter's within 3.1e-05; loss on their 321 trained "
            "tokens 1.2346.\nGreedy answers to their prompts ended with EOS in 3 of 4 cases within 256 tokens.\n"
            ) in text
    assert "| step-1217 | 100 | 1.5000 | 4.48 | 97.0% (within 256 tokens) |\n" in text and text.endswith("|\n")


def test_an_unverified_adapters_card(tmp_path):
    run = run_dir(tmp_path, lora=LoraRecord(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    write_model_card(run, str(tmp_path), step=9, dtype="float32", summary=ExportSummary(),
                     adapter_base="meta-llama/Llama-2-7b-hf")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert card.data.tags == ["alpaca", "lora", "levanter"]
    text = card.text
    assert "(rank 8, alpha 16, on q_proj, v_proj)" in text and "checkpoint `step-9`" in text
    assert "tokens training added ([PAD])" in text
    assert 'model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")' in text
    assert "Checked:" not in text and "Export check" not in text and text.endswith("```\n")


def test_eval_refreshes_the_merged_models_card_and_leaves_an_adapters(tmp_path):
    from alpaca_cli.config import ExportConfig
    from alpaca_cli.core.export import refresh_model_card
    from alpaca_cli.records import ExportOutputs, ExportRecord

    score = EvalScore(model="step-9", examples=8, loss=0.5, perplexity=1.6487, eos_stop_rate=1.0, max_new_tokens=64)
    for adapter in (False, True):
        (tmp_path / str(adapter)).mkdir()
        run = run_dir(tmp_path / str(adapter), scores=[score])
        run.manifest.stages["export"] = ExportRecord(
            status=COMPLETE, config=ExportConfig(adapter=adapter), step=9, summary=VERIFIED,
            outputs=ExportOutputs(export_dir="hf", dtype="float32", step=9))
        readme = tmp_path / str(adapter) / "llama2-alpaca" / "hf" / "README.md"
        readme.parent.mkdir()
        readme.write_text("the card as exported")
        refresh_model_card(run)
        if adapter:  # an adapter's card lists no scores
            assert readme.read_text() == "the card as exported"
        else:
            assert "| step-9 | 8 | 0.5000 | 1.65 | 100.0% (within 64 tokens) |" in readme.read_text()
