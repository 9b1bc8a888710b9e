"""The parts count stored with every message (`segments`) is the count of the split a handset sees.

send_many() counts parts without splitting a text that surely fits one part; whatever the text
(GSM-7, its extension characters, UCS-2, emoji as surrogate pairs, around every boundary), the
count must be that of `split`.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.segments import count, split

LETTERS = st.sampled_from(list("abc XYZ019@£$\n") + list("^{}\\[~]|€") + ["é", "ж", "中", "😀", "👍🏽"])


@settings(max_examples=600, deadline=None)
@given(st.lists(LETTERS, max_size=400).map("".join))
def test_the_count_is_the_number_of_parts_of_the_split(text):
    assert count(text) == split(text).count


def test_the_count_at_each_boundary():
    for n in (0, 1, 34, 35, 36, 69, 70, 71, 152, 153, 154, 159, 160, 161, 306, 307):
        for text in ("a" * n, "€" * n, "ж" * n, "😀" * n, "a" * max(n - 1, 0) + "€", "😀" + "a" * max(n - 1, 0)):
            assert count(text) == split(text).count, (n, text[:3])
