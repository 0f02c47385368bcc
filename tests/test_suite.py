"""The suite's own bookkeeping: every test conftest.SLOW names still exists."""
import re
from pathlib import Path

from conftest import HERE, SLOW


def test_every_slow_name_is_a_test():
    for key in SLOW:
        path, function = key.split("::")
        text = (HERE / path).read_text()
        assert re.search(rf"^def {function}\(", text, re.M), f"conftest.SLOW names no test: {key}"
