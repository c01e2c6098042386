"""What a command printed after the runner's one-line stage reports (``X: done|cached|
resumed ...``), which come first: the summary tests read."""

import re

STAGE_REPORT = re.compile(r"^[\w+]+: (done|cached|resumed)\b")


def summary(out: str) -> str:
    """``out`` without the stage-report lines."""
    return "".join(ln for ln in out.splitlines(keepends=True) if not STAGE_REPORT.match(ln))
