"""The site's layout on a 390 px phone and a 1280 px laptop, and the task page's plot, in a real browser.

Playwright driving the system Chromium, pages opened from file:// (see test_leaderboard_browser.py; skips, saying
which is missing, when either is absent). What is checked:
- no page scrolls sideways and no element shows past the viewport (a wide table may scroll inside its own box,
  which never scrolls vertically too); at 1280 px the task table fits without any sideways scroll;
- the plot: tick labels never overlap and step 1-2-5; outliers are clipped to the frame with an arrow and their
  value; the front's labels never cover each other or a point; a tap shows the tooltip first, a second tap on the
  same point opens its run.
Set BENCH_DOCS_SCREENSHOT=1 to also refresh docs/leaderboard-phone.png and docs/leaderboard-laptop.png (from this
repository's results/).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from leaderboard.build import build_site
from browser_kit import REPO, Watched
from lb_synth import XSS, make_result, write

PHONE, LAPTOP = 390, 1280


def Screen(browser, width: int, height: int = 900) -> Watched:
    """A page at one width (a phone, below 600 px, is a touch screen)."""
    return Watched(browser, width, height, device_scale_factor=1)


# Every element's box as it shows: cut by each ancestor that clips or scrolls sideways. What shows past the
# viewport is what a reader would have to scroll the page sideways for.
OVERFLOW_JS = """(vw) => {
  const out = [];
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (!(r.width > 0 && r.height > 0)) continue;
    let left = r.left, right = r.right;
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      if (getComputedStyle(a).overflowX !== 'visible') {
        const b = a.getBoundingClientRect(); left = Math.max(left, b.left); right = Math.min(right, b.right);
      }
    }
    if (right > left && (right > vw + 0.5 || left < -0.5))
      out.push(el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
               (el.className && el.className.baseVal === undefined ? '.' + String(el.className).split(' ').join('.') : '') +
               ' ' + Math.round(left) + '..' + Math.round(right));
  }
  return {scroll: document.documentElement.scrollWidth, body: document.body.scrollWidth, out: out.slice(0, 8)};
}"""

# Scroll boxes that scroll both ways: a table whose links are reachable only by scrolling a box sideways that
# also scrolls vertically
DOUBLE_SCROLL_JS = """() => Array.from(document.querySelectorAll('body *')).filter(el => {
  const s = getComputedStyle(el);
  return ['auto', 'scroll'].includes(s.overflowY) && el.scrollHeight > el.clientHeight + 1 &&
         el.scrollWidth > el.clientWidth + 1;
}).map(el => el.tagName + '.' + el.className)"""


def check_fits(screen: Watched, what: str) -> None:
    got = screen.page.evaluate(OVERFLOW_JS, screen.width)
    assert got["scroll"] <= screen.width and got["body"] <= screen.width, (what, screen.width, got)
    assert got["out"] == [], (what, screen.width, got["out"])
    assert screen.page.evaluate(DOUBLE_SCROLL_JS) == [], what


def layout_tree(root: Path) -> Path:
    """digits on two profiles with every family, long strings (hyper-parameters, a hostile one), a failed run and
    a verified one: what makes tables wide."""
    long_hp = {"init": "draft", "steps": 1000, "batch_size": 8, "lr": 0.0005, "warmup_steps": 100,
               "teacher_mix": 0.2, "max_new_tokens": 160}
    write(make_result(method="none", hp={}, delta=0.0, speedup=1.0, sci=0.02, n=1), root)
    write(make_result(method="kd", hp=long_hp, delta=-0.004, speedup=3.0, n=2), root, verified=True)
    write(make_result(method="kd", hp={"temperature": 2.0, "alpha": 0.9}, delta=-0.03, speedup=3.1, n=3), root)
    write(make_result(method="magnitude", hp={"sparsity": 0.5, XSS: XSS}, delta=-0.002, speedup=1.4, n=4,
                      paper=XSS, command=f"bench run --set note='{XSS}'"), root)
    write(make_result(method="tinybert", hp={"layers": 4}, delta=-0.001, speedup=1.9, n=5), root)
    write(make_result(method="deepcache", hp={"interval": 3}, delta=-0.006, speedup=2.2, n=6), root)
    write(make_result(method="speculative", hp={"k": 4}, delta=0.0, speedup=0.9, n=7), root)
    write(make_result(method="wanda", hp={"sparsity": 0.5}, delta=-0.008, speedup=1.2, n=8, speed_status="unreliable"),
          root)
    write(make_result(method="kd", status="failed", n=9), root)
    write(make_result(method="kd", profile="h100-bf16", hp=long_hp, delta=-0.001, speedup=5.0, n=10), root)
    return root


def pages_of(site: Path) -> dict[str, Path]:
    run = sorted((site / "runs" / "cpu" / "digits" / "kd").glob("*.html"))[0]
    pages = {"home": site / "index.html", "task": site / "tasks" / "digits.html", "run": run,
             "method": site / "methods" / "kd.html", "methods index": site / "methods" / "index.html",
             "methodology": site / "methodology.html"}
    return {k: v for k, v in pages.items() if v.is_file()}


@pytest.mark.parametrize("width", [PHONE, LAPTOP])
def test_no_page_scrolls_sideways(browser, tmp_path: Path, width: int):
    site = build_site(layout_tree(tmp_path / "results"), tmp_path / "site").out
    screen = Screen(browser, width)
    page = screen.page
    pages = pages_of(site)
    assert {"home", "task", "run", "method", "methods index"} <= set(pages)
    for name, path in pages.items():
        screen.goto(path.as_uri())
        check_fits(screen, name)
        page.screenshot(path=str(tmp_path / f"{name.replace(' ', '-')}-{width}.png"), full_page=True)
    # the task page: every row's figures and its run link reachable without scrolling sideways
    screen.goto(pages["task"].as_uri())
    table = page.locator("#table")
    assert page.locator("#tbody tr[data-id]").count() == 8  # the failed run has no row
    box, wrap = table.bounding_box(), page.locator(".table-wrap").bounding_box()
    assert box["width"] <= wrap["width"] + 1, (box, wrap)
    for link in page.locator("#tbody a[href*='/runs/']:visible").all()[:3]:
        b = link.bounding_box()
        assert 0 <= b["x"] and b["x"] + b["width"] <= width, b
    # all columns: still no sideways page scroll (the table may scroll inside its box on a phone)
    if page.locator("#toggle-cols").count():
        page.locator("#toggle-cols").click()
        page.wait_for_function("document.getElementById('table').classList.contains('all-cols')")
        check_fits(screen, "task, all columns")
        page.screenshot(path=str(tmp_path / f"task-all-columns-{width}.png"), full_page=True)
    screen.close()


# ---- the plot ------------------------------------------------------------------------------------------------

def boxes(page, selector: str) -> list[dict]:
    return page.eval_on_selector_all(selector, """els => els.map(e => { const r = e.getBoundingClientRect();
        return {x: r.left, y: r.top, w: r.width, h: r.height, text: e.textContent,
                cls: e.getAttribute('class'), i: e.getAttribute('data-i')}; })""")


def overlap(a: dict, b: dict, gap: float = 0.0) -> bool:
    return (a["x"] < b["x"] + b["w"] + gap and b["x"] < a["x"] + a["w"] + gap and
            a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def is_125(values: list[float]) -> bool:
    """Ticks at 1-2-5 steps: evenly spaced by 1, 2 or 5 x 10^k, or each of them 1, 2 or 5 x 10^k."""
    def mantissa_ok(v: float) -> bool:
        m = v / 10 ** math.floor(math.log10(v))
        return any(abs(m - k) < 1e-6 for k in (1, 2, 5, 10))
    if len(values) >= 2:
        steps = {round(b - a, 9) for a, b in zip(values, values[1:])}
        if len(steps) == 1 and mantissa_ok(steps.pop()):
            return True
    return all(mantissa_ok(v) for v in values)


def tick_values(texts: list[str]) -> list[float]:
    return [float(re.sub(r"[^0-9.eE+-]", "", t.replace("−", "-"))) for t in texts]


def narrow_tree(root: Path) -> Path:
    """Speedups between 2.2x and 2.8x: where 2.20x 2.40x 2.60x 2.80x ran into each other."""
    write(make_result(method="none", hp={}, delta=0.0, speedup=1.0, sci=0.02, n=1), root)
    for i, s in enumerate([2.2, 2.3, 2.35, 2.45, 2.5, 2.6, 2.7, 2.8]):
        write(make_result(method=("kd", "magnitude", "deepcache", "speculative")[i % 4], hp={"step": i},
                          delta=-0.002 * i, speedup=s, sci=0.01, n=10 + i), root)
    return root


@pytest.mark.parametrize("width", [PHONE, LAPTOP])
def test_plot_ticks_never_overlap(browser, tmp_path: Path, width: int):
    site = build_site(narrow_tree(tmp_path / "results"), tmp_path / "site").out
    screen = Screen(browser, width)
    page = screen.page
    screen.goto((site / "tasks" / "digits.html").as_uri() + "#budget=100%25")
    svg = page.locator("#plot svg").bounding_box()
    for axis in ("xtick", "ytick"):
        ticks = boxes(page, f"#plot text.{axis}")
        assert len(ticks) >= 2, (axis, ticks)
        for a, b in zip(ticks, ticks[1:]):
            assert not overlap(a, b, gap=2 if axis == "xtick" else 0), (width, a, b)
        for t in ticks:  # inside the SVG
            assert svg["x"] - 0.5 <= t["x"] and t["x"] + t["w"] <= svg["x"] + svg["width"] + 0.5, (t, svg)
        values = tick_values([t["text"] for t in ticks])
        assert values == sorted(values) or values == sorted(values, reverse=True)
        if axis == "xtick":
            assert len(ticks) >= 3, ticks
            assert is_125(values), values
    # the narrow range is labelled where the points are: ticks between 2.2x and 2.8x (two on a laptop)
    xs = tick_values([t["text"] for t in boxes(page, "#plot text.xtick")])
    assert sum(2.2 <= v <= 2.8 for v in xs) >= (2 if width == LAPTOP else 1), xs
    page.locator("#plot").screenshot(path=str(tmp_path / f"plot-ticks-{width}.png"))
    screen.close()


def test_plot_is_drawn_at_its_width(browser, tmp_path: Path):
    """One SVG unit is one CSS pixel (text keeps its size on a phone), and a new width draws it again."""
    site = build_site(narrow_tree(tmp_path / "results"), tmp_path / "site").out
    screen = Screen(browser, LAPTOP)
    page = screen.page
    screen.goto((site / "tasks" / "digits.html").as_uri())
    width = "() => [+document.querySelector('#plot svg').getAttribute('viewBox').split(' ')[2], " \
            "document.getElementById('plot').clientWidth]"
    drawn, box = page.evaluate(width)
    assert abs(drawn - box) <= 1, (drawn, box)
    page.set_viewport_size({"width": 700, "height": 900})
    page.wait_for_function(f"(({width})()).reduce((a, b) => Math.abs(a - b)) <= 1")
    assert page.evaluate(width)[1] < box
    screen.close()


def outlier_tree(root: Path) -> Path:
    """Everything within a point or two of the reference, and one result 50 points below it."""
    write(make_result(method="none", hp={}, delta=0.0, speedup=1.0, sci=0.02, n=1), root)
    for i, (d, s) in enumerate([(-0.002, 1.5), (-0.006, 2.0), (-0.01, 2.6), (0.0, 1.1), (-0.004, 1.3),
                                (-0.015, 1.8)]):
        write(make_result(method=("kd", "magnitude", "deepcache")[i % 3], hp={"step": i}, delta=d, speedup=s,
                          dci=0.004, n=10 + i), root)
    write(make_result(method="wanda", hp={"layers": 1}, delta=-0.5, speedup=2.4, dci=0.04, n=30), root)
    return root


@pytest.mark.parametrize("width", [PHONE, LAPTOP])
def test_plot_clips_outliers_to_the_frame(browser, tmp_path: Path, width: int):
    site = build_site(outlier_tree(tmp_path / "results"), tmp_path / "site").out
    screen = Screen(browser, width)
    page = screen.page
    screen.goto((site / "tasks" / "digits.html").as_uri() + "#budget=100%25")
    points = boxes(page, "#plot circle.pt")
    assert len(points) == 8
    clipped = boxes(page, "#plot circle.pt.clipped")
    assert len(clipped) == 1
    frame = page.locator("#plot clipPath rect").bounding_box()
    c = clipped[0]
    assert frame["y"] <= c["y"] and c["y"] + c["h"] <= frame["y"] + frame["height"] + 0.5  # drawn inside the frame
    assert c["y"] > frame["y"] + frame["height"] / 2  # at the bottom edge: it went past the bottom
    assert page.locator("#plot path.clip-arrow").count() == 1
    value = page.locator("#plot text.clipval")
    assert value.count() == 1 and "50" in value.text_content() and "↓" in value.text_content()
    # the range that matters is kept: the y axis stops well short of -50 pp
    ys = tick_values(page.locator("#plot text.ytick").all_text_contents())
    assert min(ys) > -10 and max(ys) < 10, ys
    # its tooltip has the true value
    row = page.locator("#tbody tr[data-id]").all_inner_texts()
    i = clipped[0]["i"]
    if width == LAPTOP:
        page.locator(f"#plot circle.pt[data-i='{i}']").hover()
    else:
        page.locator(f"#plot circle.pt[data-i='{i}']").tap()
    assert page.locator("#tip").is_visible() and "50" in page.locator("#tip").inner_text(), row
    page.locator("#plot").screenshot(path=str(tmp_path / f"plot-outlier-{width}.png"))
    screen.close()


def crowded_front_tree(root: Path) -> Path:
    """A front of eight points close together, with others around them: labels have to find room."""
    write(make_result(method="none", hp={}, delta=0.0, speedup=1.0, sci=0.02, n=1), root)
    front = [(1.3, 0.0), (1.6, -0.002), (1.9, -0.004), (2.2, -0.006), (2.5, -0.009), (2.8, -0.012), (3.1, -0.016),
             (3.4, -0.02)]
    names = ["kd", "tinybert", "magnitude", "wanda", "deepcache", "speculative", "kd", "magnitude"]
    for i, ((s, d), m) in enumerate(zip(front, names)):
        write(make_result(method=m, hp={"front": i}, delta=d, speedup=s, sci=0.01, dci=0.003, n=10 + i), root)
    for i in range(10):  # dominated ones, near the front
        s, d = front[i % 8]
        write(make_result(method=names[(i + 3) % 8], hp={"off": i}, delta=d - 0.004 - 0.001 * i, speedup=s * 0.97,
                          sci=0.01, dci=0.003, n=40 + i), root)
    return root


@pytest.mark.parametrize("width", [PHONE, LAPTOP])
def test_plot_labels_the_front_without_collisions(browser, tmp_path: Path, width: int):
    site = build_site(crowded_front_tree(tmp_path / "results"), tmp_path / "site").out
    screen = Screen(browser, width)
    page = screen.page
    screen.goto((site / "tasks" / "digits.html").as_uri() + "#budget=100%25")
    front = boxes(page, "#plot circle.pt.on-front")
    labels = boxes(page, "#plot text.front-label")
    points = boxes(page, "#plot circle.pt")
    assert len(front) >= 6
    assert len(labels) >= (len(front) if width == LAPTOP else 2), (len(labels), len(front))
    front_i = {p["i"] for p in front}
    rows = page.locator("#tbody tr[data-id]")
    methods = {r.get_attribute("data-id"): r for r in rows.all()}
    assert methods  # the table is there
    svg = page.locator("#plot svg").bounding_box()
    for n, a in enumerate(labels):
        assert a["i"] in front_i  # a label names a point of the front
        assert svg["x"] <= a["x"] and a["x"] + a["w"] <= svg["x"] + svg["width"] + 0.5
        for b in labels[n + 1:]:
            assert not overlap(a, b), (a, b)
        for p in points:
            assert not overlap(a, p), (a, p)
    for t in boxes(page, "#plot text.clipval"):
        for a in labels:
            assert not overlap(a, t), (a, t)
    page.locator("#plot").screenshot(path=str(tmp_path / f"plot-labels-{width}.png"))
    screen.close()


def test_a_tap_shows_the_tooltip_first(browser, tmp_path: Path):
    site = build_site(outlier_tree(tmp_path / "results"), tmp_path / "site").out
    screen = Screen(browser, PHONE, height=800)
    page = screen.page
    url = (site / "tasks" / "digits.html").as_uri() + "#budget=100%25"
    screen.goto(url)
    point = page.locator("#plot circle.pt:not(.noise)").first
    i = point.get_attribute("data-i")
    point.scroll_into_view_if_needed()
    tip = page.locator("#tip")
    # a tap beside a small point counts (the nearest point within reach); it shows the tooltip and stays
    c = point.bounding_box()
    page.touchscreen.tap(c["x"] + c["width"] / 2 + 8, c["y"] + c["height"] / 2 + 8)
    assert tip.is_visible() and page.url == url
    assert "tap again" in tip.inner_text()
    b = tip.bounding_box()
    assert 0 <= b["x"] and b["x"] + b["width"] <= PHONE, b  # inside the phone's screen
    # a tap away from every point closes it: in the plot, or anywhere else
    svg = page.locator("#plot svg").bounding_box()
    page.touchscreen.tap(svg["x"] + 4, svg["y"] + 4)
    assert tip.is_hidden() and page.url == url
    page.touchscreen.tap(c["x"] + c["width"] / 2, c["y"] + c["height"] / 2)
    assert tip.is_visible()
    legend = page.locator("#legend").bounding_box()
    page.touchscreen.tap(legend["x"] + legend["width"] - 4, legend["y"] + 4)
    assert tip.is_hidden() and page.url == url
    # the first tap on a point shows its tooltip and does not navigate; a second tap on it opens its run
    point.tap()
    assert tip.is_visible() and page.url == url
    with page.expect_navigation():
        page.locator(f"#plot circle.pt[data-i='{i}']").tap()  # the second tap on the same point opens its run
    assert "/runs/cpu/digits/" in page.url
    screen.close()


# ---- the README's screenshots ------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("BENCH_DOCS_SCREENSHOT") != "1", reason="set BENCH_DOCS_SCREENSHOT=1 to refresh "
                    "docs/leaderboard-phone.png and docs/leaderboard-laptop.png")
def test_docs_screenshots(browser, tmp_path: Path):
    real = REPO / "results"
    if not any(real.rglob("*.json")):
        pytest.skip("no committed results")
    site = build_site(real, tmp_path / "site").out
    task = "arith" if (site / "tasks" / "arith.html").is_file() else sorted((site / "tasks").glob("*.html"))[0].stem
    (REPO / "docs").mkdir(exist_ok=True)
    for width, name, height in ((PHONE, "phone", 1700), (LAPTOP, "laptop", None)):
        screen = Screen(browser, width)
        screen.goto((site / "tasks" / f"{task}.html").as_uri())
        check_fits(screen, task)
        out = str(REPO / "docs" / f"leaderboard-{name}.png")
        if height:  # the phone: the first screens (budget, plot, the first cards)
            full = screen.page.evaluate("document.documentElement.scrollHeight")
            screen.page.screenshot(path=out, full_page=True,
                                   clip={"x": 0, "y": 0, "width": width, "height": min(height, full)})
        else:
            screen.page.screenshot(path=out, full_page=True)
        screen.close()
