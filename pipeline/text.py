"""Character classes every layer needs the same way: what counts as Chinese text."""
from __future__ import annotations

import re

#: CJK unified ideographs (extension A, the basic block, compatibility ideographs): one character, one word.
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
HAS_CJK = re.compile(f"[{CJK}]")


def language(text: str) -> str:
    """"zh" when the text has any CJK character, else "en": the two score on different scales."""
    return "zh" if HAS_CJK.search(text) else "en"
