"""What every document source shares (moejax/data/corpus.py): the train/validation split by a
stable hash of each document's path."""
from moejax.data import corpus, stdlib_corpus


def test_large_corpus_split_is_the_plain_hash():
    """python_stdlib (prepared, cached) keeps its split: the fallback never applies to it."""
    relative = [r for r, _ in stdlib_corpus.stdlib_sources()]
    assert corpus.validation_flags(relative) == [corpus.is_validation(r) for r in relative]
