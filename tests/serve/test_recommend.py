"""`POST /v1/recommend` for a recommender folder, matching the Python API; bad requests answered with 400."""

import httpx
import pytest

from palmkit.recommend.recommender import load_recommender
from palmkit.serve.app import create_app
from tests.serve.conftest import running

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]  # tiny models: one thread


def test_served_recommender_answers_v1_recommend(recommender_dir):
    folder = recommender_dir[0] / "model"
    expected = load_recommender(folder).recommend("3", k=4)
    with running(create_app(folder, model_name="rec")) as base:
        post = lambda body: httpx.post(f"{base}/v1/recommend", json={"model": "rec", **body}, timeout=60)
        r = post({"user": 3, "k": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        # the user's likes are not told to whoever names the user
        assert body["personalised"] and expected.history and body["history"] == []
        assert all("because" not in d for d in body["data"])
        assert [d["item"] for d in body["data"]] == [it["item"] for it in expected.items]
        assert [d["score"] for d in body["data"]] == pytest.approx([it["score"] for it in expected.items], abs=1e-3)
        assert [d["rank"] for d in body["data"]] == [1, 2, 3, 4]
        unknown = post({"user": "nobody", "k": 2}).json()
        assert not unknown["personalised"] and "unknown user" in unknown["notice"] and len(unknown["data"]) == 2
        own = post({"history": ["1", "3"], "k": 2}).json()
        assert own["personalised"] and len(own["history"]) == 2 and all("because" in d for d in own["data"])
        for bad in ({"user": "3", "history": ["1"]}, {}, {"history": ["nope"]}, {"user": "3", "k": 0},
                    {"user": "3", "system": "magic"}, {"user": "3", "k": "4"}, {"user": 3.5}, {"user": "3", "k": 4.0},
                    {"history": [1.5]}):
            assert post(bad).status_code == 400, bad
        assert httpx.post(f"{base}/v1/recommend", json={"model": "other", "user": "3"}).status_code == 404
