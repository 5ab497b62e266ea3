"""The quickstart's summary: each language's perplexity beside the unigram baseline, and one verdict line."""

import math

from palmkit.apps.quickstart import unigram_table


def metrics(ppl: dict[str, float]) -> dict[str, float]:
    out = {}
    for lang, p in ppl.items():
        out |= {f"val/{lang}/ppl": p, f"val/{lang}/loss": math.log(p), f"val/{lang}/bpb": 1.5}
    return out


def test_ratio_beside_each_language_and_all_beaten():
    rows = unigram_table(metrics({"en": 200.0, "zh": 400.0}), {"zh": 1000.0, "en": 800.0})
    assert rows[2] == "| en | 200.0 | 800.0 | 4.00x | 1.500 |"
    assert rows[3] == "| zh | 400.0 | 1000.0 | 2.50x | 1.500 |"
    assert rows[-1] == "Better than the unigram baseline in all 2 languages: by 2.50x at least (zh)."


def test_languages_still_behind_the_baseline_are_named():
    rows = unigram_table(metrics({"de": 500.0, "ja": 900.0, "ru": 700.0}), {"de": 800.0, "ja": 850.0, "ru": 700.0})
    assert "| ja | 900.0 | 850.0 | 0.94x | 1.500 |" in rows
    # equal perplexity is not better: ru is named with ja
    assert rows[-1] == ("Not yet better than the unigram baseline in ja, ru of 3 languages: train longer "
                        "(--minutes).")


def test_a_run_folder_continues_with_the_recipe_it_was_started_with(tmp_path, capsys):
    import json

    from palmkit.apps.quickstart import continue_as_saved
    from palmkit.train.config import TrainConfig

    options = TrainConfig(preset="small", lr=5e-3, max_minutes=20)
    assert continue_as_saved(tmp_path, options) == options  # a new folder: the options as given
    # a folder saved by an older palmkit: AdamW at 3e-3, one lr for all weights (no embed_lr_ratio in the file)
    old = {"preset": "small", "optimizer": "adamw", "lr": 3e-3, "warmup_steps": 10, "max_minutes": 10}
    (tmp_path / "train_config.json").write_text(json.dumps({"train": old}))
    got = continue_as_saved(tmp_path, options)
    assert (got.optimizer, got.lr, got.warmup_steps, got.embed_lr_ratio) == ("adamw", 3e-3, 10, 1.0)
    assert got.max_minutes == 20  # the time budget is the caller's to extend
    assert "continuing with them: " in capsys.readouterr().out


def test_the_default_model_fits_minutes_of_cpu_training():
    """A few million tokens train a model of a few million parameters best: the quickstart's default is one."""
    import inspect

    from palmkit.apps.quickstart import quickstart
    from palmkit.model.palm import build_model, preset

    defaults = {k: p.default for k, p in inspect.signature(quickstart).parameters.items()}
    model = build_model(preset(defaults["preset"], vocab_size=defaults["vocab_size"]), "meta")
    assert 5e6 < model.num_params() < 10e6
