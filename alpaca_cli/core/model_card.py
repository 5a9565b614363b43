"""The export's model card (README.md): huggingface_hub's `ModelCard` from the templates in
alpaca_cli/assets/model_cards/, filled from the run's records (how it was trained, what --verify and `alpaca eval`
measured, how to use it)."""

from __future__ import annotations

import os
from typing import Optional

from alpaca_cli import __version__
from alpaca_cli.records import ExportSummary
from alpaca_cli.rundir import RunDir

TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "model_cards")
INSTRUCTION = "Give three tips for staying healthy."
"""The request the cards' usage examples make."""


def write_model_card(run: RunDir, folder: str, *, step: int, dtype: str, summary: Optional[ExportSummary],
                     adapter_base: Optional[str] = None) -> None:
    """README.md in folder: the merged model's card, or (adapter_base: what the adapter names as its base) the
    adapter's."""
    card = (_adapter_card(run, step, summary, adapter_base) if adapter_base is not None
            else _merged_card(run, step, dtype, summary))
    card.save(os.path.join(folder, "README.md"))


def _merged_card(run: RunDir, step: int, dtype: str, summary: Optional[ExportSummary]):
    from huggingface_hub import ModelCardData

    prep, train = run.require_prepare(), run.require_train()
    base = train.inputs.model
    hub_base = base if ("/" in base and not os.path.exists(base) and "://" not in base) else None
    card_data = ModelCardData(library_name="transformers", base_model=hub_base, datasets=_hub_dataset(run),
                              pipeline_tag="text-generation", tags=["alpaca", "instruction-tuning", "levanter"])
    ev = run.eval
    scores = ev.scores if ev is not None and ev.complete else []
    return _render("merged.md", card_data, run, summary, base=base, step=step, dtype=dtype,
                   data=_data_description(run), prep=prep, plan=train.plan,
                   final_loss=train.summary.final_loss if train.summary else None,
                   scores=scores, eval_data=os.path.basename(ev.data) if scores else None)


def _adapter_card(run: RunDir, step: int, summary: Optional[ExportSummary], adapter_base: str):
    from huggingface_hub import ModelCardData

    prep, train = run.require_prepare(), run.require_train()
    card_data = ModelCardData(library_name="peft", base_model=adapter_base, datasets=_hub_dataset(run),
                              pipeline_tag="text-generation", tags=["alpaca", "lora", "levanter"])
    return _render("adapter.md", card_data, run, summary, base=train.inputs.model, step=step, lora=train.lora,
                   adapter_base=adapter_base, added_tokens=", ".join(prep.summary.added_tokens.values()))


def _render(template: str, card_data, run: RunDir, summary: Optional[ExportSummary], **facts):
    """The card from its template, with what every card shows: the run's name, its prompts (or the chat template a
    conversation run trained with), --verify's figures."""
    from huggingface_hub import ModelCard

    prompts = run.require_prepare().config.prompts
    return ModelCard.from_template(
        card_data, template_path=os.path.join(TEMPLATES, template), name=run.name, version=__version__,
        prompts=prompts, chat_template=run.require_prepare().chat_template,
        instruction=INSTRUCTION, example=repr(prompts.prompt_no_input.format(instruction=INSTRUCTION)),
        summary=summary, verified=summary is not None and summary.verify_max_abs_diff is not None, **facts,
    )


def _hub_dataset(run: RunDir) -> Optional[list[str]]:
    data = run.require_prepare().inputs.data
    return [data.id] if data.kind == "hub" else None


def _data_description(run: RunDir) -> str:
    prep = run.require_prepare()
    data = prep.inputs.data
    if data.kind == "hub":
        return (f"[{data.id}](https://huggingface.co/datasets/{data.id}) "
                f"(split `{data.split}`, revision `{data.revision}`)")
    return f"`{os.path.basename(prep.config.data)}` (sha256 `{data.sha256}`)"
