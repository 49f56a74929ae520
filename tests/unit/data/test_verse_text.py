"""The verse cleaner, on each kind of markup the SWORD modules leave in their text."""

from clusterlm.data.verse_text import clean_verse


def test_strongs_numbers_go_whole_and_as_residue():
    markup = '<w lemma="strong:H5315 H2416">hay vida</w>, <w lemma="strong:H3605">toda</w>'
    assert clean_verse(markup) == "hay vida, toda"
    assert clean_verse("en que hay vida <H2416>, toda hierba") == "en que hay vida, toda hierba"


def test_footnotes_are_dropped_without_gluing_words():
    markup = (
        'the light<note placement="foot"><reference type="annotateRef">1.4 </reference>'
        "the light from…: Heb. between</note>from the darkness"
    )
    assert clean_verse(markup) == "the light from the darkness"


def test_added_words_stay_apart_from_their_neighbours():
    markup = 'hay allí<transChange type="added">también</transChange>bdelio y piedra'
    assert clean_verse(markup) == "hay allí también bdelio y piedra"


def test_divine_name_markers_go():
    markup = 'by my name \\nd <w lemma="strong:H3068">JEHOVAH</w></divineName> was I'
    assert clean_verse(markup) == "by my name JEHOVAH was I"
    assert clean_verse("the \\nd LORD\\+nd*, therefore") == "the LORD, therefore"


def test_paragraph_marks_and_spacing_go():
    assert clean_verse("¶ And Hamor  and\nShechem came .") == "And Hamor and Shechem came."


def test_psalm_titles_are_kept_and_other_headings_dropped():
    canonical = '<title canonical="true" type="psalm">A Psalm of David.</title> The LORD'
    assert clean_verse(canonical) == "A Psalm of David. The LORD"
    assert clean_verse("<title><foreign>ב BETH.</foreign></title> Wherewithal") == "Wherewithal"
