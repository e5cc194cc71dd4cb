"""The guided tour in docs/ runs: every ```python block of every page (docs/*.md but the
index), in order, one page per test in a fresh namespace and an empty working directory;
and every picture a page shows exists in docs/img/ (tools/draw_tour.py writes them, with
the same extraction, which this test imports)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import draw_tour  # tools/ is not a package

PAGES = draw_tour.pages()
IDS = [p.name for p in PAGES]


def test_the_index_links_every_page():
    index = (draw_tour.DOCS / "README.md").read_text(encoding="utf-8")
    assert len(PAGES) >= 9
    assert [p.name for p in PAGES if f"]({p.name})" not in index] == []


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_page_runs(page, tmp_path, monkeypatch):
    if "from transformer_lens" in page.read_text(encoding="utf-8"):
        pytest.importorskip("transformer_lens")  # the `.[interop]` extra
    monkeypatch.chdir(tmp_path)
    draw_tour.run_page(page)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_page_has_python(page):
    assert draw_tour.python_blocks(page.read_text(encoding="utf-8")), f"{page.name}: no ```python block"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_pictures_exist(page):
    missing = [n for n in draw_tour.linked_images(page.read_text(encoding="utf-8"))
               if not (draw_tour.IMG / n).is_file()]
    assert not missing, f"{page.name} shows img/{missing[0]}, absent from docs/img (run tools/draw_tour.py)"


def test_extraction():
    text = "\n".join([
        "# Page", "", "```python", "x = 1", "```", "", "```bash", "fgpt info", "```",
        "![a map](img/a.png) and ![b](img/b.png)", "```python", "", "assert x == 1", "```", "",
    ])
    blocks = draw_tour.python_blocks(text)
    assert [(b.number, b.line, b.code, b.first_line) for b in blocks] == [
        (1, 4, "x = 1\n", "x = 1"), (2, 12, "\nassert x == 1\n", "assert x == 1")]
    assert draw_tour.linked_images(text) == ["a.png", "b.png"]


def test_a_failing_block_names_page_block_and_line(tmp_path, monkeypatch):
    page = tmp_path / "99-broken.md"
    page.write_text("Intro.\n\n```python\nx = 1\n```\n\n```bash\nfgpt info --not python\n```\n\n"
                    "```python\ny = x + 1\nassert y == 3, y\n```\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(draw_tour.BlockError, match=r"^99-broken\.md: python block 2 \(line 12: 'y = x \+ 1'\) "
                                                   r"failed at line 13: AssertionError: 2$") as info:
        draw_tour.run_page(page)
    assert isinstance(info.value.__cause__, AssertionError)


def test_blocks_share_a_namespace_and_run_in_the_working_directory(tmp_path, monkeypatch):
    page = tmp_path / "99-ok.md"
    page.write_text("```python\nopen('out.png', 'wb').write(b'x')\nn = 1\n```\n\n```python\nassert n == 1\n```\n")
    monkeypatch.chdir(tmp_path)
    assert draw_tour.run_page(page)["n"] == 1
    assert (tmp_path / "out.png").read_bytes() == b"x"
