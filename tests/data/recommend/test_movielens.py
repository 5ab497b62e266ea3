import pytest

from palmkit.data.recommend import MOVIELENS, Movie, load_movielens, read_items, read_ratings
from palmkit.data.recommend.movielens import FOLDER, natural_title
from palmkit.errors import PalmkitError
from tests.conftest import movielens_files


def test_reads_ratings_and_movies(tmp_path):
    ratings, movies = load_movielens(movielens_files(tmp_path))
    assert len(ratings) == 24 * 14 and len(movies) == 30
    first = ratings[0]
    assert first.user == "1" and first.time == 880000001 and first.rating in (1, 2, 4, 5)
    assert movies["3"] == Movie("3", "The Funny Film 3", "1983", ("Comedy",))
    assert movies["3"].text == "The Funny Film 3 (1983): Comedy"


def test_the_package_names_the_files_it_reads():
    assert MOVIELENS.spec == "recbole==1.2.1"
    assert all(m.startswith(FOLDER) for m in MOVIELENS.members)


@pytest.mark.parametrize(("title", "spoken"), [("Usual Suspects, The", "The Usual Suspects"),
                                               ("Postino, Il", "Postino, Il"), ("Toy Story", "Toy Story"),
                                               ("Man Who Knew Too Little, A", "A Man Who Knew Too Little")])
def test_natural_title(title, spoken):
    assert natural_title(title) == spoken


def test_an_unknown_year_and_genre_are_left_out(tmp_path):
    path = tmp_path / "x.item"
    path.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                    "267\tunkonwn\tunkonwn\tunknown\n", encoding="utf-8")
    movie = read_items(path)["267"]
    assert (movie.year, movie.genres, movie.text) == ("", (), "unkonwn")


@pytest.mark.parametrize(("line", "problem"), [("1\t2\t4\n", "line 3: 3 tab-separated fields, expected 4"),
                                               ("1\t2\tfour\t5\n", "line 3: rating 'four' is not a number"),
                                               ("\t2\t4\t5\n", "line 3: empty user_id")])
def test_a_malformed_ratings_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "ml.inter"
    path.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t10\n" + line)
    with pytest.raises(PalmkitError, match=f"{path}: {problem}"):
        read_ratings(path)


def test_a_wrong_header_or_a_duplicate_item_is_refused(tmp_path):
    path = tmp_path / "ml.inter"
    path.write_text("user\titem\trating\ttime\n1\t1\t5\t10\n")
    with pytest.raises(PalmkitError, match="line 1: header"):
        read_ratings(path)
    items = tmp_path / "ml.item"
    items.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                     "1\tA\t1990\tDrama\n1\tB\t1991\tDrama\n")
    with pytest.raises(PalmkitError, match=f"{items}: line 3: item_id 1 appears twice"):
        read_items(items)


def test_a_rating_of_an_unknown_item_is_refused(tmp_path):
    root = movielens_files(tmp_path)
    inter = root / "recbole-1.2.1" / FOLDER / "ml-100k.inter"
    inter.write_text(inter.read_text() + "1\t999\t5\t1\n")
    with pytest.raises(PalmkitError, match=r"item\(s\) 999 are not in ml-100k\.item"):
        load_movielens(root)
