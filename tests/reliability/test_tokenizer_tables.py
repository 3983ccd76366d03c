"""The sentence-end table is cached per tokenizer object for as long as that object lives, never by a
reusable key such as ``id()``."""
import gc

from skimfx.runtime import sentences
from skimfx.runtime.sentences import sentence_end_table


class WordTok:
    """A tokenizer whose vocabulary is a given list of token strings."""

    all_special_ids: list[int] = []

    def __init__(self, tokens):
        self.tokens = list(tokens)

    def __len__(self):
        return len(self.tokens)

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]


def test_each_tokenizer_gets_its_own_table_even_when_ids_are_reused():
    # CPython frees an object when its last reference goes and reuses the memory at once, so the
    # tokenizers below mostly share an id(); each must still get the table of its own vocabulary.
    ids = set()
    for n in range(1, 40):
        tok = WordTok(["a"] * n + ["end."])
        ids.add(id(tok))
        table = sentence_end_table(tok)
        assert table.shape == (n + 1,) and table[-1] and not table[:-1].any(), n
        del tok, table
    assert len(ids) < 39                     # ids were reused: the case the cache must get right


def test_a_table_is_reused_while_its_tokenizer_lives_and_dropped_after():
    tok = WordTok(["Hello", "world", "."])
    assert sentence_end_table(tok) is sentence_end_table(tok)
    before = len(sentences._TABLES)
    del tok
    gc.collect()
    assert len(sentences._TABLES) == before - 1


def test_an_unhashable_tokenizer_is_served_without_caching():
    class Unhashable(WordTok):
        __hash__ = None

    tok = Unhashable(["x", "y."])
    assert sentence_end_table(tok).tolist() == [False, True]
