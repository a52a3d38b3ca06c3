"""WordNet 3.0 for nltk's METEOR: nltk's own copy, else Debian's ``wordnet-base`` package.

nltk's METEOR matches synonyms through WordNet. ``nltk.download("wordnet")`` needs a
network that this project's machines lack, so :func:`wordnet` falls back to the files
of Debian's ``wordnet-base`` in ``/usr/share/wordnet`` (``make venv`` installs the
package where apt-get works). They are the WordNet 3.0 database that nltk reads, less
``lexnames``, the fixed table of the 45 lexicographer files (``man 5 lexnames``), and
``index.sense``; nltk's reader opens both when it starts. :class:`DebianWordNet` serves
the first from :data:`LEXNAMES` and skips what needs the second: mapping synsets of other
WordNet versions onto 3.0, which the multilingual (OMW) functions use and METEOR does not.
nltk reads corpora only under its data path, so that directory is appended to
``nltk.data.path``.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader

DEBIAN_DIR = Path("/usr/share/wordnet")
MISSING = (
    "nltk finds no WordNet: install Debian's wordnet-base (`apt-get install "
    "wordnet-base`, as `make venv` does where apt-get works) or run "
    "nltk.download('wordnet')"
)

_LEXICOGRAPHER_FILES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
# WordNet 3.0's dict/lexnames: "<number>\t<file name>\t<syntactic category>" per line.
LEXNAMES = "".join(
    f"{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n"
    for i, name in enumerate(_LEXICOGRAPHER_FILES)
)


class DebianWordNet(WordNetCorpusReader):
    """nltk's WordNet reader over Debian's files, with the ``lexnames`` table they lack."""

    def open(self, file):
        return io.StringIO(LEXNAMES) if file == "lexnames" else super().open(file)

    def map_wn(self, version="wordnet"):
        """None: no mapping from another WordNet version, these files are WordNet 3.0 itself."""


@functools.cache
def wordnet() -> WordNetCorpusReader | None:
    """nltk's WordNet if nltk has one, else Debian's, else None (the reason is :data:`MISSING`)."""
    try:
        nltk.data.find("corpora/wordnet")
        return nltk.corpus.wordnet
    except LookupError:
        pass
    if not (DEBIAN_DIR / "data.noun").is_file():
        return None
    if str(DEBIAN_DIR) not in nltk.data.path:
        nltk.data.path.append(str(DEBIAN_DIR))
    with warnings.catch_warnings():  # "multilingual functions are not available": not needed
        warnings.simplefilter("ignore", UserWarning)
        return DebianWordNet(str(DEBIAN_DIR), None)
