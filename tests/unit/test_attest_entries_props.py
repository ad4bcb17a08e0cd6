"""Property: once a file of entries is accepted, the identity never depends on entry order."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.attest.entries import Entries, load_entries_text
from sidecar.attest.facts import ProcessFacts
from sidecar.util.errors import AttestationError

SELECTORS = [
    "unix:uid:1",
    "unix:uid:2",
    "unix:gid:1",
    "unix:gid:2",
    "unix:path:/bin/a",
    "unix:path:/bin/b",
    "cgroup:path:/x",
    "cgroup:path:/x/y",
    "cgroup:path:/z",
]
IDS = ["spiffe://example.org/a", "spiffe://example.org/b", "spiffe://example.org/c"]

entry_st = st.tuples(
    st.sampled_from(IDS),
    st.lists(st.sampled_from(SELECTORS), min_size=1, max_size=3, unique=True),
)

FACTS = ProcessFacts(
    pid=1,
    start_time=1,
    uid=1,
    gid=1,
    user=None,
    exe_path="/bin/a",
    exe_deleted=False,
    exe_dev=0,
    exe_ino=0,
    exe_size=0,
    exe_mtime_ns=0,
    sha256=None,
    cgroup_path="/x/y/w",
    parent_identity=None,
)
facts_st = st.builds(
    lambda uid, gid, path, cg: dataclasses.replace(
        FACTS, uid=uid, gid=gid, exe_path=path, cgroup_path=cg
    ),
    st.sampled_from([1, 2, 3]),
    st.sampled_from([1, 2, 3]),
    st.sampled_from(["/bin/a", "/bin/b", "/bin/c"]),
    st.sampled_from(["/x", "/x/y", "/x/y/w", "/z", "/"]),
)


def load(items: list[tuple[str, list[str]]]) -> Entries | None:
    body = "".join(f"  - spiffeId: {sid}\n    selectors: [{', '.join(s)}]\n" for sid, s in items)
    text = "apiVersion: sidecar/v1\nkind: RegistrationEntries\ntrustDomain: example.org\n"
    text += "entries:\n" + (body or "  []\n")
    try:
        return load_entries_text(text, "p.yaml")
    except AttestationError:
        return None


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(entry_st, max_size=6),
    facts=st.lists(facts_st, min_size=1, max_size=5),
    data=st.data(),
)
def test_accepted_entries_give_the_same_identity_in_any_order(
    items: list[tuple[str, list[str]]], facts: list[ProcessFacts], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(items))
    first, second = load(items), load(shuffled)
    assert (first is None) == (second is None)  # validation does not depend on order
    if first is None or second is None:
        return
    for f in facts:
        a, b = first.match(f), second.match(f)
        assert (a and a.spiffe_id) == (b and b.spiffe_id)
