"""`clusterlm bench compare-deepspeed` refuses bad arguments with one line before anything runs
(the comparison itself: tests/dist/test_compare_deepspeed.py, where DeepSpeed is installed)."""

import pytest

from clusterlm.cli.bench_compare import main
from clusterlm.errors import UserError


@pytest.mark.parametrize(
    "argv",
    [
        ["--stages", "4"],
        ["--stages", "x"],
        ["--nproc", "0"],
        ["--accumulation", "0"],
        ["--paired-rounds", "0"],
        ["--warmup", "-1"],
    ],
)
def test_bad_arguments_raise_one_line_user_errors(argv):
    with pytest.raises(UserError) as error:
        main(argv)
    assert "\n" not in str(error.value)
