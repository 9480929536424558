"""Generated kernel sources: saved once under the cache root, by content, and importable."""
from cryokern.kernels.codegen import Source, load_module


def test_source_is_saved_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path))
    text = Source()("def f(a):").indent()("return a + 1").text()
    first = load_module("probe", text)
    files = list((tmp_path / "kernels").glob("probe_*.py"))
    assert len(files) == 1 and first.f(1) == 2
    stamp = files[0].stat().st_mtime_ns
    second = load_module("probe", text)
    assert second.f(2) == 3 and files[0].stat().st_mtime_ns == stamp   # not rewritten
    load_module("probe", text.replace("+ 1", "+ 2"))
    assert len(list((tmp_path / "kernels").glob("probe_*.py"))) == 2    # new source, new file
