"""Whether the heap uses huge pages: read from GLIBC_TUNABLES and the kernel's THP mode (tiers/host_memory.py)."""

from vorch_jax.tiers.host_memory import huge_page_heap


def _mode(tmp_path, text):
    f = tmp_path / "enabled"
    f.write_text(text)
    return str(f)


def test_on_only_with_the_tunable_and_thp_not_never(tmp_path):
    madvise = _mode(tmp_path, "always [madvise] never\n")
    assert huge_page_heap("glibc.malloc.hugetlb=1", madvise)
    assert huge_page_heap("glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2", madvise)
    assert not huge_page_heap("", madvise)
    assert not huge_page_heap("glibc.malloc.hugetlb=0", madvise)
    assert not huge_page_heap("glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=0", madvise)  # the last one counts
    assert not huge_page_heap("glibc.malloc.hugetlb=1", _mode(tmp_path, "always madvise [never]\n"))
    assert not huge_page_heap("glibc.malloc.hugetlb=1", str(tmp_path / "no-such-file"))
