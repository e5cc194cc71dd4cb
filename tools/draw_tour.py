"""Regenerate the guided tour's pictures, docs/img/*.png, by running the tour's code.

Each page of docs/ is run as tests/test_docs.py runs it: its ```python blocks in order,
in one fresh namespace, in a temporary working directory. A page that shows
`![...](img/NAME.png)` has a block that writes NAME.png into its working directory;
that file is copied to docs/img/NAME.png.

    python tools/draw_tour.py                         # every page
    python tools/draw_tour.py docs/03-attention.md    # some pages (paths or file names)

The extraction and the runner live here alone; the test imports them.
"""

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
IMG = DOCS / "img"

# A fenced block: ``` at the start of a line, its info string (the language), the code,
# and the closing ``` alone on its line.
_FENCE = re.compile(r"^```[ \t]*(?P<lang>[^\s`]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_IMAGE = re.compile(r"!\[[^\]]*\]\(img/(?P<name>[^)\s]+)\)")


class Block(NamedTuple):
    number: int  # 1-based, among the page's python blocks
    line: int  # line of the page where the code starts (after the opening fence)
    code: str

    @property
    def first_line(self) -> str:
        return next((s.strip() for s in self.code.splitlines() if s.strip()), "")


class BlockError(AssertionError):
    """A block of a page failed; the message names the page, the block and its first line."""


def pages() -> list[Path]:
    """Every page of the tour, docs/*.md but the index (README.md), sorted by name."""
    return sorted(p for p in DOCS.glob("*.md") if p.name != "README.md")


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a page, in order (```bash and any other language are not run)."""
    blocks = []
    for m in _FENCE.finditer(text):
        if m["lang"] == "python":
            line = text.count("\n", 0, m.start("code")) + 1
            blocks.append(Block(len(blocks) + 1, line, m["code"]))
    return blocks


def linked_images(text: str) -> list[str]:
    """The file names a page shows as `![alt](img/NAME)`, in order."""
    return [m["name"] for m in _IMAGE.finditer(text)]


def run_page(path: Path) -> dict:
    """Run the python blocks of the page at `path` in order, in one fresh namespace, in the
    current working directory -> the namespace. Tracebacks point at the page's own lines.
    A failing block raises BlockError naming the page, the block number, its first line
    and the page's line where it failed, chained to the original exception. Environment
    variables a page sets are undone afterwards."""
    import matplotlib

    matplotlib.use("Agg")  # pictures go to files; no window
    text = path.read_text(encoding="utf-8")
    namespace = {"__name__": "__tour__"}
    saved_env = os.environ.copy()
    try:
        for block in python_blocks(text):
            # Padding with blank lines makes line numbers in tracebacks those of the page.
            code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
            try:
                exec(code, namespace)
            except Exception as e:
                at = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
                where = f" at line {at[-1]}" if at else ""
                what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                raise BlockError(f"{path.name}: python block {block.number} (line {block.line}: "
                                 f"{block.first_line!r}) failed{where}: {what}") from e
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        import matplotlib.pyplot as plt

        plt.close("all")
    return namespace


def draw(path: Path) -> list[str]:
    """Run one page in a temporary directory and copy the pictures it links into docs/img/
    -> their names. A linked picture the page did not write is an error."""
    names = linked_images(path.read_text(encoding="utf-8"))
    IMG.mkdir(exist_ok=True)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="tour-") as tmp:
        os.chdir(tmp)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):  # one progress line per page, not the page's prints
                run_page(path)
        except BaseException:
            sys.stderr.write(printed.getvalue())
            raise
        finally:
            os.chdir(cwd)
        missing = [n for n in names if not (Path(tmp) / n).is_file()]
        if missing:
            raise SystemExit(f"{path.name}: links img/{missing[0]}, which its blocks did not write")
        for name in names:
            shutil.copyfile(Path(tmp) / name, IMG / name)
    return names


def _page(arg: str) -> Path:
    path = Path(arg)
    if not path.is_file():
        path = DOCS / path.name
    if not path.is_file() or path.suffix != ".md":
        raise SystemExit(f"{arg}: not a page of docs/ (pages: {', '.join(p.name for p in pages())})")
    return path.resolve()


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # as in the tests: the tour's tiny models only lose time to a second thread
    todo = [_page(a) for a in argv] if argv else pages()
    for path in todo:
        t0 = time.perf_counter()
        names = draw(path)
        shown = ", ".join(f"img/{n}" for n in names) or "no pictures"
        print(f"{path.name}: {len(python_blocks(path.read_text(encoding='utf-8')))} blocks, {shown} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
