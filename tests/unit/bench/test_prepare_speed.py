"""`clusterlm bench prepare`: the generated corpus, and the figures it prints."""

from clusterlm.bench.prepare_speed import bench_prepare, variant_corpus
from clusterlm.data.prepare import PrepareOptions
from clusterlm.data.quality import CleaningOptions


def test_generated_corpus_is_the_size_asked_and_seeded(tmp_path):
    size = variant_corpus(tmp_path / "a", 0.5)
    assert 0.5e6 <= size < 0.7e6
    variant_corpus(tmp_path / "b", 0.5)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all(
        (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names
    )


def test_prints_each_process_count_and_compares_outputs(capsys):
    options = PrepareOptions(inputs=(), out="", cleaning=CleaningOptions(dedup="near"))
    lines = bench_prepare(options, [1, 2], 0.3, 1)
    assert lines[1].startswith("--nproc 1:") and lines[2].startswith("--nproc 2:")
    assert lines[-1] == "outputs byte-identical: yes"
