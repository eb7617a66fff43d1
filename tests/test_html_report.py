"""HTML review (`lumbar-ray report`): index.html + one page per study, escaping, no network
references, the CLI, and a render in a real headless browser (Debian chromium)."""

from __future__ import annotations

import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import (  # tests/ is on sys.path (conftest.py)
    chromium_path,
    dump_dom,
    screenshot,
)
from matplotlib.image import imread
from test_report import fake_study, predictions
from typer.testing import CliRunner

from lumbar_ray.cli import app
from lumbar_ray.dicom.errors import StudyNotFoundError
from lumbar_ray.outputs import overlays
from lumbar_ray.outputs.html_report import (
    INDEX_NAME,
    study_page_name,
    write_html_report,
)
from lumbar_ray.outputs.store import OutputWriter
from lumbar_ray.targets import TARGETS

# Strings a data folder or a flag could hold that would run in a page if written unescaped.
HOSTILE_ID = '<img src=x onerror=alert(1)>&"\''
HOSTILE_FLAG = '<script>alert("flag")</script>'
SEVERE_SPINAL = TARGETS[3].index  # spinal canal stenosis L4/L5
DRAWABLE = ("101", "102")  # studies whose images "exist"; HOSTILE_ID's do not


def write_scores(out: Path, version: str = "v1", run: str = "r1") -> None:
    with OutputWriter(out, run, version) as writer:
        writer.write(pd.concat([
            predictions("101", severe={SEVERE_SPINAL}),
            predictions("102").assign(flags=f"{HOSTILE_FLAG};series_missing:Axial T2"),
            predictions(HOSTILE_ID, undetected={0, 1}),
        ]))


def fake_read_study(root, study_id, split):
    if study_id in DRAWABLE:
        return fake_study(study_id)
    raise StudyNotFoundError(f"{root}/{split}_images/{study_id}", "study folder does not exist")


def no_images(root, study_id, split):
    raise StudyNotFoundError(f"{root}/{split}_images/{study_id}", "study folder does not exist")


@pytest.fixture
def scored(tmp_path, monkeypatch) -> Path:
    """A scoring output of three studies; their images are missing (quick: no overlays drawn)."""
    monkeypatch.setattr(overlays, "read_study", no_images)
    out = tmp_path / "scores"
    write_scores(out)
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The report of three scored studies, two of them with images (drawn once for the module:
    the overlays take seconds). Tests read it; a test that writes copies it first."""
    out = tmp_path_factory.mktemp("scores")
    to = tmp_path_factory.mktemp("report")
    write_scores(out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(overlays, "read_study", fake_read_study)
        result = write_html_report(out, "data-root", to)
    assert result.index == str(to / INDEX_NAME)
    assert [p.study_id for p in result.without_overlays] == [HOSTILE_ID]
    return to


@pytest.fixture
def report_copy(report, tmp_path) -> Path:
    to = tmp_path / "report"
    shutil.copytree(report, to)
    return to


class Page(HTMLParser):
    """What the checks need from a page: links, image sources, and the body rows of each table."""

    def __init__(self, text: str):
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.rows: dict[str, int] = {}
        self.text: list[str] = []
        self._table: str | None = None
        self._in_body = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and "href" in attrs:
            self.hrefs.append(attrs["href"])
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
        if tag == "table":
            self._table = attrs.get("id", "")
            self.rows[self._table] = 0
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body and self._table is not None:
            self.rows[self._table] += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Files, links, escaping
# --------------------------------------------------------------------------------------------


def test_every_scored_study_has_a_linked_page(report):
    to = report
    index = parse(to / INDEX_NAME)
    ids = ["101", "102", HOSTILE_ID]
    assert sorted(p.name for p in to.glob("*.html")) == sorted([INDEX_NAME, *map(study_page_name, ids)])
    # the worklist's order (highest priority first), each row a link to an existing page
    order = ["101", "102", HOSTILE_ID]  # 101 has a Severe finding; 102 and HOSTILE_ID tie, in id order
    assert order[0] == "101" and index.rows["worklist"] == 3
    assert [h for h in index.hrefs] == [study_page_name(s) for s in order]
    for href in index.hrefs:
        assert (to / href).is_file(), href
    for sid in ids:
        page = parse(to / study_page_name(sid))
        assert page.rows["findings"] == len(TARGETS)  # the 25 findings
        assert INDEX_NAME in page.hrefs  # back to the worklist
    # overlays: the PNGs under their usual names, referenced relatively and present
    study = parse(to / study_page_name("101"))
    assert study.srcs == ["101_sagittal_t1.png", "101_sagittal_t2_stir.png", "101_axial_t2.png"]
    assert all((to / src).is_file() for src in study.srcs)
    assert "Severe" in "".join(study.text)


def test_study_without_images_keeps_its_page_with_a_note(report):
    to = report
    page = parse(to / study_page_name(HOSTILE_ID))
    text = " ".join(page.text)
    assert page.srcs == [] and page.rows["findings"] == len(TARGETS)
    assert "Overlays not drawn" in text and "study folder does not exist" in text
    assert "not drawn" in " ".join(parse(to / INDEX_NAME).text)


def test_values_from_files_are_escaped(report):
    to = report
    pages = sorted(to.glob("*.html"))
    assert len(pages) == 4
    for path in pages:
        text = path.read_text(encoding="utf-8")
        for hostile in (HOSTILE_ID, HOSTILE_FLAG, "<script", "onerror=alert(1)>"):
            assert hostile not in text, (path.name, hostile)
    index = (to / INDEX_NAME).read_text(encoding="utf-8")
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;" in index  # shown, as text
    assert "&lt;script&gt;alert(&quot;flag&quot;)&lt;/script&gt;" in index
    assert HOSTILE_FLAG in " ".join(parse(to / study_page_name("102")).text)  # the reader sees the flag
    # an id that is not a safe file name gets a page name that is one
    assert re.fullmatch(r"study_[A-Za-z0-9._-]+\.html", study_page_name(HOSTILE_ID))


def test_pages_need_no_network(report):
    to = report
    texts = {p.name: p.read_text(encoding="utf-8") for p in to.glob("*.html")}
    assert texts
    for name, text in texts.items():
        assert "http://" not in text and "https://" not in text, name
        assert not re.search(r"<(script|link|iframe|object|embed)\b", text, re.IGNORECASE), name
        assert "@import" not in text and not re.search(r"url\(", text), name
        page = Page(text)
        for ref in page.hrefs + page.srcs:  # relative file names only: no scheme, no //host
            assert not re.match(r"^([a-z][a-z0-9+.-]*:|//)", ref, re.IGNORECASE), (name, ref)


def test_no_page_is_written_for_a_study_that_failed(scored, tmp_path):
    """A study with errors and no predictions is listed on the index with its reason."""
    out = scored
    with OutputWriter(out, "r1", "v1") as writer:
        writer.write(errors=pd.DataFrame([{"study_id": "103", "series_id": None, "stage": "read",
                                           "error_type": "NoUsableSlicesError", "message": "no usable slices <b>"}]))
    to = tmp_path / "report"
    result = write_html_report(out, "data-root", to)
    assert "103" not in {p.study_id for p in result.pages}
    index = parse(to / INDEX_NAME)
    assert index.rows["errors"] == 1
    assert "no usable slices <b>" in "".join(index.text)


def test_model_version_and_study_selection(scored, tmp_path):
    write_scores(scored, version="v2", run="r2")
    with pytest.raises(ValueError, match="model versions"):
        write_html_report(scored, "data-root", tmp_path / "any")
    result = write_html_report(scored, "data-root", tmp_path / "one", model_version="v2", studies=["102"])
    assert [p.study_id for p in result.pages] == ["102"] and result.model_version == "v2"
    assert sorted(p.name for p in (tmp_path / "one").glob("*.html")) == [INDEX_NAME, "study_102.html"]
    assert parse(tmp_path / "one" / INDEX_NAME).rows["worklist"] == 1
    with pytest.raises(ValueError, match="no predictions for studies 999"):
        write_html_report(scored, "data-root", tmp_path / "none", model_version="v2", studies=["999"])


def test_cli_report(scored, tmp_path, monkeypatch):
    monkeypatch.setattr(overlays, "read_study", fake_read_study)
    runner = CliRunner()
    to = tmp_path / "cli"
    done = runner.invoke(app, ["report", "--scores", str(scored), "--data", "data-root", "--to", str(to),
                               "--study", "101"])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    # the names the single-study report always had, then where the index went
    assert [Path(line).name for line in lines[1:4]] == ["101_sagittal_t1.png", "101_sagittal_t2_stir.png", "101_axial_t2.png"]
    assert lines[-1].startswith(f"wrote {to / INDEX_NAME} (1 study pages")
    monkeypatch.setattr(overlays, "read_study", no_images)  # quicker: the pages only
    everything = runner.invoke(app, ["report", "--scores", str(scored), "--data", "data-root", "--to", str(to)])
    assert everything.exit_code == 0, everything.output
    assert "3 study pages, 3 without overlays" in everything.output
    assert "study 102: overlays not drawn: StudyNotFoundError" in everything.output
    unknown = runner.invoke(app, ["report", "--scores", str(scored), "--data", "d", "--to", str(to), "--study", "999"])
    assert unknown.exit_code == 2 and "error: no predictions for studies 999" in unknown.output


# --------------------------------------------------------------------------------------------
# A real browser
# --------------------------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(chromium_path() is None,
                                   reason="no chromium (LUMBAR_RAY_CHROMIUM or on PATH; Debian: apt-get install chromium); "
                                          "the HTML report's browser checks need it")

# Written into a copy of a page: puts the rectangle of `#ID tbody` (CSS pixels) into the DOM,
# for --dump-dom to read back. The report itself has no scripts.
_PROBE = ('<script>var r = document.querySelector("#{id} tbody").getBoundingClientRect();'
          'document.body.setAttribute("data-rect", [r.left, r.top, r.right, r.bottom].join(","));</script>')


def rendered_table(page: Path, table_id: str) -> tuple[Page, tuple[int, int, int, int]]:
    """The DOM chromium built for ``page`` and the rectangle (left, top, right, bottom) of the
    table's body there, from one run on a copy of the page with the probe added."""
    probe = page.with_name(f"probe_{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE.format(id=table_id) + "</body>"))
    dom = dump_dom(probe)
    probe.unlink()
    match = re.search(r'data-rect="([-\d.,]+)"', dom)
    assert match, f"the probe found no #{table_id} tbody"
    return Page(dom), tuple(int(float(v)) for v in match.group(1).split(","))  # type: ignore[return-value]


def dark_pixels(png: Path, rect: tuple[int, int, int, int]) -> int:
    """Pixels of text-like darkness inside ``rect`` (clipped to the screenshot)."""
    img = imread(io.BytesIO(png.read_bytes()))[..., :3]
    left, top, right, bottom = rect
    region = img[max(top, 0):min(bottom, img.shape[0]), max(left, 0):min(right, img.shape[1])]
    return int((region.mean(axis=2) < 0.35).sum())


def without_table_rows(page: Path) -> Path:
    """A copy of ``page`` with every table body emptied (and the overlays, which would move up
    into their place): the control the screenshot check must tell apart."""
    control = page.with_name(f"control_{page.name}")
    text = re.sub(r"<tbody>.*?</tbody>", "<tbody></tbody>", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    control.write_text(re.sub(r"<figure>.*?</figure>", "", text, flags=re.DOTALL))
    return control


@pytest.mark.browser
@needs_browser
@pytest.mark.parametrize("which, table_id, n_rows", [("index", "worklist", 3), ("study", "findings", len(TARGETS))])
def test_browser_shows_the_table(report_copy, tmp_path, which, table_id, n_rows):
    to = report_copy
    page = to / (INDEX_NAME if which == "index" else study_page_name("101"))
    # the DOM the browser built holds the rows
    dom, rect = rendered_table(page, table_id)
    assert dom.rows[table_id] == n_rows
    # the screenshot shows them: dark text where the table body is, none there without the rows
    assert rect[3] - rect[1] > 10 * n_rows // 2 and rect[0] < 1280 and rect[1] < 900, rect
    shot = screenshot(page, tmp_path / f"{which}.png")
    control = screenshot(without_table_rows(page), tmp_path / f"{which}_control.png")
    img = imread(io.BytesIO(shot.read_bytes()))
    assert img.shape[:2] == (900, 1280)
    assert img[..., :3].std() > 0.05  # not a blank page
    shown, empty = dark_pixels(shot, rect), dark_pixels(control, rect)
    assert shown > 300 * min(n_rows, 20) // 3 and empty < shown / 10, (shown, empty)
    if which == "index":  # the severe study is first, and its worst canal grade is drawn in red
        top_row = imread(io.BytesIO(shot.read_bytes()))[rect[1]:rect[1] + 24, :, :3]
        assert int(((top_row[..., 0] > 0.7) & (top_row[..., 1] < 0.3) & (top_row[..., 2] < 0.3)).sum()) > 20


@pytest.mark.browser
@needs_browser
def test_browser_loads_the_overlays_offline(report_copy):
    """The study page's images load from the report folder (the browser has no network)."""
    to = report_copy
    page = to / study_page_name("101")
    probe = page.with_name("probe_images.html")
    probe.write_text(page.read_text(encoding="utf-8").replace('loading="lazy"', "").replace(
        "</body>", '<script>window.addEventListener("load", function () {document.body.setAttribute("data-loaded", '
                   'Array.from(document.images).filter(function (i) {return i.naturalWidth > 0;}).length);});</script></body>'))
    dom = dump_dom(probe)
    assert re.search(r'data-loaded="3"', dom), dom[-500:]
    assert np.all([(to / src).is_file() for src in Page(dom).srcs])
