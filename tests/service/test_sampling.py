"""The sampling helpers shared by the native and the Tinker surface."""

import pytest

from losskit.service.errors import ServiceError
from losskit.service.sampling import check_prompt


@pytest.mark.parametrize(("prompt", "code", "words"), [
    ([], "validation_error", "prompt is empty"),
    ([0, 5, 9], "token_out_of_range", "prompt token 9 is outside the vocabulary [0, 9)"),
    ([3, -1, 12], "token_out_of_range", "prompt token -1 is outside"),
])
def test_bad_prompts_are_named(prompt, code, words):
    with pytest.raises(ServiceError) as info:
        check_prompt(prompt, 9)
    assert info.value.code == code and words in str(info.value)


def test_a_good_prompt_passes():
    assert check_prompt([0, 8, 4], 9) is None
