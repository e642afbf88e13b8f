"""errors.first_line: an exception's message as one line for an error or a warning."""
from __future__ import annotations

from carsam_onnx.errors import first_line


def test_a_short_message_is_kept_whole():
    assert first_line(ValueError("bad value")) == "bad value"


def test_only_the_first_line_is_kept():
    assert first_line(RuntimeError("CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation'")) == \
        "CUDA error: out of memory"


def test_a_long_line_is_cut_at_a_word_and_marked():
    e = RuntimeError("CUDA out of memory. Tried to allocate 32.00 MiB. GPU 0 has a total capacity of 79.18 GiB of "
                     "which 14.62 MiB is free.")
    got = first_line(e, 80)
    assert len(got) <= 80 and got.endswith(" ...") and got.startswith("CUDA out of memory. Tried to allocate")
    assert got[:-4] == e.args[0][:len(got) - 4] and e.args[0][len(got) - 4] == " "    # whole words only


def test_a_word_longer_than_the_limit_is_cut_inside_it():
    assert first_line(ValueError("x" * 50), 20) == "x" * 16 + " ..."


def test_no_message_gives_the_type():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("  \n ")) == "OSError"
