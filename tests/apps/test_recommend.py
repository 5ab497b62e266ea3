import json

import pytest

from palmkit.apps.recommend import recipe, recommend_command
from palmkit.cli import main
from palmkit.errors import PalmkitError
from palmkit.recommend.recommender import load_recommender
from tests.conftest import movielens_files


def test_the_recipe_writes_a_recommender_and_a_report(recommender_dir):
    out, summary = recommender_dir
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["systems"]) == {"popularity", "retriever", "lm", "combination"}
    assert report["users"] == 23 and report["items"] == 30  # the user without likes has nothing to find
    for metrics in report["systems"].values():
        assert 0 <= metrics["recall@10"] <= 1 and 0 <= metrics["ndcg@10"] <= 1
    md = (out / "eval" / "report.md").read_text()
    assert "| combination |" in md and "Cold-start slice" in md and (out / "eval" / "metrics.png").stat().st_size
    assert "palmkit recommend --checkpoint" in summary
    # the two tastes of the fixture are easy for the retriever: it finds more than popularity does
    assert report["systems"]["retriever"]["ndcg@10"] > report["systems"]["popularity"]["ndcg@10"]


def test_recommend_prints_titles_scores_and_where_they_came_from(recommender_dir):
    out, _ = recommender_dir
    text = recommend_command(str(out / "model"), "1", k=3)
    lines = text.splitlines()
    assert lines[0].startswith("user 1 liked: ") and lines[1] == "recommended:"
    assert len(lines) == 5 and all(" <- " in line for line in lines[2:])
    rec = load_recommender(out / "model")
    liked = set(rec.likes["1"])
    got = json.loads(recommend_command(str(out / "model"), "1", k=3, json_output=True))
    assert got["personalised"] and not {it["item"] for it in got["items"]} & (rec.rated["1"] | liked)


def test_an_unknown_user_gets_the_labelled_popularity_list(recommender_dir):
    out, _ = recommender_dir
    text = recommend_command(str(out / "model"), "nobody", k=2)
    assert "unknown user 'nobody'" in text and "most popular (not personalised):" in text
    assert len(text.splitlines()) == 4


def test_the_cli_prints_the_list(recommender_dir, capsys):
    folder = str(recommender_dir[0] / "model")
    assert main(["recommend", "--checkpoint", folder, "--user", "1", "--k", "2"]) == 0
    assert capsys.readouterr().out == recommend_command(folder, "1", k=2) + "\n"
    assert main(["recommend", "--checkpoint", str(recommender_dir[0]), "--user", "1"]) == 2
    assert "not a recommender folder" in capsys.readouterr().err


def test_a_folder_with_the_users_files_is_refused_before_anything_is_touched(tmp_path, checkpoint):
    model = tmp_path / "out" / "model"
    model.mkdir(parents=True)
    (model / "recommender.json").write_text("{}")
    (model / "notes.txt").write_text("mine")
    with pytest.raises(PalmkitError, match=r"notes\.txt"):
        recipe(checkpoint=str(checkpoint), out=str(tmp_path / "out"), data=str(movielens_files(tmp_path)))
    assert (model / "recommender.json").read_text() == "{}" and (model / "notes.txt").is_file()
