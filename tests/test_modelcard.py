"""Model card: Hub front matter, load/generate instructions, SPECTRA config table, validate metrics and plots.

Configs are real ``SpectraConfig`` objects over tiny random configs of real architectures (llama: upcycled,
mixtral: rerouted). Reports are schema-shaped dicts (``summary`` metric -> value, optional ``layers``): the
card's job is to render whatever scalar metrics a report holds, so their values are only test inputs.
"""

from __future__ import annotations

import json

import pytest
import yaml

from spectra_convert.errors import UserError
from spectra_convert.modelcard import render_model_card, write_model_card
from spectra_convert.modeling.configuration_spectra import SpectraConfig
from tests.conftest import tiny_parent_config


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.fixture
def upcycled() -> SpectraConfig:
    return SpectraConfig(text_config=tiny_parent_config("llama").to_dict(), spectra={"num_experts": 4, "top_k": 2})


@pytest.fixture
def rerouted() -> SpectraConfig:
    return SpectraConfig(text_config=tiny_parent_config("mixtral").to_dict())


def test_front_matter_for_an_upcycled_model(upcycled):
    card = render_model_card(upcycled, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", report=None, plots=[])
    meta = front_matter(card)
    assert meta == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["mixture-of-experts", "spectra", "upcycled"],
    }
    assert "**upcycled**" in card and "4 experts" in card


def test_front_matter_for_a_rerouted_model_from_a_config_dict(rerouted):
    card = render_model_card(rerouted.to_dict(), base_model="mistralai/Mixtral-8x7B-v0.1", report=None, plots=[])
    assert front_matter(card)["tags"] == ["mixture-of-experts", "spectra", "rerouted"]
    assert "**rerouted**" in card
    assert "| parent architecture | mixtral |" in card


def test_local_base_model_is_not_claimed_as_a_hub_id(upcycled, tmp_path):
    local = tmp_path / "parent"
    local.mkdir()
    card = render_model_card(upcycled, base_model=str(local), report=None, plots=[])
    assert "base_model" not in front_matter(card)
    assert str(local) not in card and str(tmp_path) not in card  # no local absolute path (issue 20)
    assert "# parent — SPECTRA" in card and "`parent`" in card  # named by its folder's name
    assert "base_model" not in front_matter(render_model_card(upcycled, base_model=None, report=None, plots=[]))


def test_usage_and_every_routing_knob_are_shown(upcycled):
    card = render_model_card(upcycled, base_model=None, report=None, plots=[])
    assert "## How to load and generate" in card
    assert "AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True)" in card
    assert "model.generate(" in card
    for knob, value in upcycled.spectra.items():
        assert f"| spectra.{knob} |" in card, knob
    assert "| spectra.num_experts | 4 |" in card and "| spectra.top_k | 2 |" in card
    assert "No validation report" in card


def test_in_batch_models_warn_that_outputs_depend_on_the_batch():
    config = SpectraConfig(text_config=tiny_parent_config("llama").to_dict(), spectra={"balance_mode": "in_batch"})
    card = render_model_card(config, base_model=None, report=None, plots=[])
    assert "balance_mode: in_batch" in card
    assert "give the same tokens" not in card


def test_report_scalars_layers_and_plots_are_rendered(upcycled):
    report = {
        "summary": {"load_cv": 0.0734, "perplexity": 21.5, "parent_perplexity": 20.9, "collapsed": False,
                    "per_layer_cv": [0.1, 0.2], "nested": {"a": 1}},
        "layers": [{"layer": 0, "load_cv": 0.07, "gini": 0.03}, {"layer": 1, "load_cv": 0.08, "gini": 0.04}],
    }
    card = render_model_card(upcycled, base_model=None, report=report, plots=["validation/load_heatmap.png"])
    assert "| load_cv | 0.0734 |" in card
    assert "| perplexity | 21.5 |" in card and "| parent_perplexity | 20.9 |" in card
    assert "| collapsed | false |" in card
    assert "per_layer_cv" not in card and "nested" not in card  # non-scalars are not forced into the table
    assert "| layer | load_cv | gini |" in card and "| 1 | 0.08 | 0.04 |" in card
    assert "![load heatmap](validation/load_heatmap.png)" in card
    assert "No validation report" not in card


def test_write_model_card_picks_up_validation_report_and_plots(upcycled, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    upcycled.save_pretrained(tmp_path)
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "report.json").write_text(json.dumps({"summary": {"load_cv": 0.12}}))
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.imshow([[0, 1], [1, 0]])
    fig.savefig(tmp_path / "validation" / "gram.png")
    plt.close(fig)

    path = write_model_card(tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    card = path.read_text()
    assert path == tmp_path / "README.md"
    assert "| load_cv | 0.12 |" in card and "![gram](validation/gram.png)" in card
    assert front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "tmp" in p.name]  # no temp left


def test_write_model_card_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="config.json: missing"):
        write_model_card(tmp_path, base_model=None)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        write_model_card(tmp_path, base_model=None)
    assert not (tmp_path / "README.md").exists()


def test_bad_report_is_a_user_error(upcycled, tmp_path):
    upcycled.save_pretrained(tmp_path)
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "report.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="summary"):
        write_model_card(tmp_path, base_model=None)


def test_card_front_matter_is_what_huggingface_hub_parses(upcycled):
    from huggingface_hub import ModelCard

    text = render_model_card(upcycled, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", report=None, plots=[])
    data = ModelCard(text, ignore_metadata_errors=False).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert "mixture-of-experts" in data.tags
