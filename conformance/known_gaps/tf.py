"""Known gaps of the TensorFlow backend: strict xfails, each with its reason.

Each entry is ``(pattern, reason)``: ``pattern`` is matched (fnmatch) against ``test_name[param-id]``, for
example ``"test_golden[[]tf-cpu-float16-*[]]"`` (``[[]`` and ``[]]`` are literal brackets). A gap that
starts passing fails the suite (strict), so the list cannot go stale. Empty: no known gap.
"""

GAPS: list[tuple[str, str]] = []
