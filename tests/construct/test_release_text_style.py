"""write.text_style=official spells text1-3 as the published RealSyn files do: lower-cased and space-tokenised."""
import pytest

from realsyn_pl.construct.release.text_style import official_text, styled


@pytest.mark.parametrize("text,want", [
    ("It's a dog.", "it 's a dog ."),
    ("I don't know, U.S. e-mail!", "i do n't know , u.s. e - mail !"),  # case-sensitive exceptions kept whole
    ("The cat (red)  costs $5.50.\nNew line", "the cat ( red ) costs $ 5.50 . new line"),  # no whitespace tokens
    ("Dr. Smith vs. Mr. Jones", "dr. smith vs. mr. jones"),
    ("They're 'quoted' in 2020.", "they 're ' quoted ' in 2020 ."),
    ("", ""),
])
def test_official_style_exact_strings(text, want):
    assert official_text(text) == want


def test_natural_style_and_missing_texts_are_left_alone():
    assert styled("It's A Dog.", "natural") == "It's A Dog."
    assert styled(None, "official") is None
