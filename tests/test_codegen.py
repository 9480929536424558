"""Generated kernel sources: saved once under the cache root, by content, and importable."""
from cryokern.kernels import codegen
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


def test_a_new_source_announces_the_compile_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path))
    monkeypatch.setattr(codegen, "_announced", False)
    monkeypatch.setattr(codegen.config, "ENABLE_CUDASIM", 0)   # as on a GPU
    monkeypatch.setattr(codegen.sys.stderr, "isatty", lambda: True)
    text = Source()("x = 1").text()
    load_module("probe", text)
    load_module("probe", text.replace("1", "2"))
    err = capsys.readouterr().err
    assert err.count("compiling GPU kernels") == 1 and str(tmp_path) in err
    monkeypatch.setattr(codegen, "_announced", False)
    load_module("probe", text)                       # already cached: nothing to say
    assert capsys.readouterr().err == ""


def test_nothing_is_announced_to_a_redirected_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path))
    monkeypatch.setattr(codegen, "_announced", False)
    monkeypatch.setattr(codegen.config, "ENABLE_CUDASIM", 0)
    load_module("probe", Source()("x = 3").text())
    assert capsys.readouterr().err == ""
