"""Property-based: malformed records give clean `FILE:LINE:` problems, never a traceback."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_tune.data.formats import parse_record
from lora_tune.data.readers import read_records

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)
keys = st.sampled_from(
    [
        "text",
        "prompt",
        "completion",
        "messages",
        "conversations",
        "instruction",
        "input",
        "output",
        "role",
        "content",
        "from",
        "value",
        "weight",
        "x",
    ]
)
message = st.fixed_dictionaries(
    {},
    optional={"role": st.sampled_from(["user", "assistant", "system", "bot", 3]), "content": values, "weight": values},
)
records = (
    st.dictionaries(keys, values, max_size=4)
    | st.fixed_dictionaries({"messages": st.lists(message, max_size=4)})
    | st.fixed_dictionaries(
        {"conversations": st.lists(st.dictionaries(st.sampled_from(["from", "value"]), values, max_size=2), max_size=3)}
    )
    | values
)


@settings(max_examples=300, deadline=None)
@given(records)
def test_parse_record_never_raises(obj):
    rec, problems = parse_record(obj, "d.jsonl:5")
    assert (rec is None) == bool(problems)
    assert all(p.startswith("d.jsonl:5: ") for p in problems)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.one_of(records.map(lambda r: json.dumps(r).encode()), st.binary(max_size=20)), min_size=1, max_size=6)
)
def test_files_of_garbage_report_file_and_line(tmp_path, lines):
    """Random JSON and random bytes (invalid UTF-8 included), one per line."""
    path = tmp_path / "g.jsonl"
    clean = [line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines]
    path.write_bytes(b"\n".join(clean) + b"\n")
    recs, problems = read_records(path)
    for p in problems:
        head, line, _ = p.split(":", 2)
        assert head == str(path) and line.isdigit() and 1 <= int(line) <= len(lines)

    def blank(raw: bytes) -> bool:
        try:
            return not raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return False

    # every line that is not blank became a record or got a problem naming it, never both
    with_record = {int(r.where.rsplit(":", 1)[1]) for r in recs}
    with_problem = {int(p.split(":", 2)[1]) for p in problems}
    assert with_record | with_problem == {i for i, raw in enumerate(clean, start=1) if not blank(raw)}
    assert not with_record & with_problem
