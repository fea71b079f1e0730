"""The admin as a working tool (issue 15), in real headless Chromium: one server, one browser, few page loads.

A person finds music by tag (the search box and a tag filter), sees the file the
scan could not read on the failures page, pauses a queue from the dashboard
(cancelling the confirmation first, then accepting it) and resumes it, then
watches the tag queue's time left appear and change while a real ``run_tagger``
works through it; a staff
member without permissions is refused the dashboard, ``/events/`` and the plots;
the dashboard's open stream is closed after its user logs out. The dashboard and
the failures page are photographed at 375 px and 1440 px, light and dark, into
``test-artifacts/``; at 375 px neither page scrolls sideways, and the plots'
text follows the theme.

The library is small and made in-process before the server starts: two real
clips and one file that is not audio, scanned by the real scanner code
(``drain_scans``), and the two clips' tags recorded as a tagger's write records
them (``apply.record`` of ``build_tags`` on chosen scores), so that what the
search finds is known; and ``ETA_CLIPS`` one-second clips more, whose tag jobs
the scan queued, for the tagger (the real networks, on the CPU) to work through
once the searching is done.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.live import WebServer
from workers.jobs import queue
from workers.library.libraries import add_library
from workers.library.scan import request_scan
from workers.models import Track
from workers.tagging import apply
from workers.tagging.tagset import build_tags

from tests.audio_factory import make_file, make_random_bytes
from tests.conftest import drain_scans, spawn
from tests.live.browser import CHROMIUM, FLAGS, collect_static, login, make_user, playwright, wait_live

pytestmark = pytest.mark.slow

WIDE, NARROW = {"width": 1440, "height": 1000}, {"width": 375, "height": 800}
OVERFLOW_TOLERANCE = 2  # px: rounding of fractional layout widths
SCORES = {"sonata.flac": {"mtt:piano": 0.95, "mtt:classical": 0.9, "mtt:guitar": 0.01, "mtt:rock": 0.01},
          "riff.flac": {"mtt:guitar": 0.95, "mtt:rock": 0.9, "mtt:piano": 0.01, "mtt:classical": 0.01}}
ETA_CLIPS = 24
REFUSED = ["/admin/dashboard/", "/events/?channel=workers&channel=queues&channel=jobs", "/admin/dashboard/plots/"]


def tagged_demo(root: Path):
    """Two clips tagged as a tagger would record them, and ``broken.flac`` (not audio), all found by a real scan."""
    for n, name in enumerate(SCORES):
        make_file(root / f"Album {n}", "flac", seconds=1.0, seed=n, name=name)
    make_random_bytes(root / "Album 0", "broken.flac")
    for n in range(ETA_CLIPS):
        make_file(root / "Album 2", "flac", seconds=1.0, seed=10 + n, name=f"{n:02}.flac")
    library = add_library("demo", str(root))
    request_scan(library)
    assert drain_scans() == []
    for track in Track.objects.filter(library=library, path__endswith="riff.flac") | \
            Track.objects.filter(library=library, path__endswith="sonata.flac"):
        stat = os.stat(track.path)
        tags = build_tags(SCORES[Path(track.path).name], models="m")
        apply.record(track, apply.Written(tags, True, stat.st_size, stat.st_mtime_ns, "m", "uncalibrated"))
    assert Track.objects.get(path__endswith="broken.flac").state == Track.State.FAILED
    return library


def test_the_admin_as_a_tool_in_a_real_browser(worker_env, installed_models_dir, tmp_path, django_user_model,
                                               artifacts_dir, monkeypatch):
    tagged_demo(tmp_path / "music")
    # Playwright's sync API runs its event loop in this thread, which Django takes for async code; the
    # queue's state is read here between the browser's steps, never concurrently with them.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
    make_user(django_user_model, "alice", is_staff=True, is_superuser=True)
    make_user(django_user_model, "nobody", is_staff=True)
    collect_static(worker_env)
    server = WebServer(worker_env, tmp_path / "web.log").start()
    taggers = []
    start_tagger = lambda: taggers.append(  # noqa: E731
        spawn("run_tagger", "--number", 1, env={**worker_env, "EARMARK_MODELS_DIR": str(installed_models_dir)}))
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            try:
                drive(browser, server.url, artifacts_dir, start_tagger)
            finally:
                browser.close()
    finally:
        for tagger in taggers:
            tagger.terminate()
            tagger.wait(30)
        server.stop()


def drive(browser, base: str, artifacts_dir: Path, start_tagger) -> None:
    """The people's part, in an order that needs each page loaded once (logging out last ends the session)."""
    refused_without_permissions(browser.new_context(), base)
    light = browser.new_context(viewport=WIDE)
    page = light.new_page()
    errors = watch_errors(page)
    login(page, base, "alice")
    find_by_tag(page, base)
    shoot_failures(page, base, artifacts_dir, "light")
    page.goto(f"{base}/admin/dashboard/")
    wait_live(page)
    pause_and_resume(page)
    tag_eta_while_tagging(page, start_tagger)
    shoot_dashboard(page, artifacts_dir, "light")
    dark = browser.new_context(viewport=WIDE, color_scheme="dark", storage_state=light.storage_state())
    dark_page = dark.new_page()
    errors += watch_errors(dark_page)
    dark_page.goto(f"{base}/admin/dashboard/")
    shoot_dashboard(dark_page, artifacts_dir, "dark")
    shoot_failures(dark_page, base, artifacts_dir, "dark")
    shoot_plots(dark_page, base, artifacts_dir, "dark")
    favicon_is_served(dark_page, base)
    dark.close()
    page.set_viewport_size(WIDE)
    stream_closed_after_logout(light, page, base)
    assert not errors, f"a page's script failed: {errors}"


def watch_errors(page) -> list[str]:
    """The page's uncaught script errors, collected so that one at the end fails the test."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def result_names(page) -> set[str]:
    """The file names in the track list's rows."""
    paths = page.eval_on_selector_all("#result_list tbody tr", "rows => rows.map(r => r.textContent)")
    return {name for name in SCORES if any(name in p for p in paths)}


def find_by_tag(page, base: str) -> None:
    """Search "piano" with the track list's search box, then filter it by a tag value from its sidebar."""
    page.goto(f"{base}/admin/workers/track/")
    assert result_names(page) == set(SCORES), "both tagged tracks listed before searching"
    page.fill("#searchbar", "piano")
    with page.expect_navigation():
        page.press("#searchbar", "Enter")
    assert result_names(page) == {"sonata.flac"}, "search matches the tag value"
    page.fill("#searchbar", "")
    with page.expect_navigation():
        page.press("#searchbar", "Enter")
    with page.expect_navigation():
        page.click('#changelist-filter a:text-matches("^guitar \\\\(1\\\\)$")')
    assert "instrument=guitar" in page.url
    assert result_names(page) == {"riff.flac"}, "the instrument filter keeps only the guitar track"


def queue_row(page, name: str) -> dict:
    """The dashboard's row of one queue, as drawn: its "paused" cell, and whether the page was reloaded."""
    return page.evaluate("""name => {
        const row = document.querySelector(`#earmark-queues tr[data-key="queue:${name}"]`);
        return {paused: row ? row.querySelector('[data-field="paused"]').textContent : null,
                marker: window.__earmarkMarker === true};
    }""", name)


def pause_and_resume(page) -> None:
    """Pause the tag queue from the dashboard (a cancelled confirmation changes nothing), then resume it."""
    dialogs: list[str] = []
    page.evaluate("window.__earmarkMarker = true")
    page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.click('button[value="pause:tag"]')
    assert dialogs == ["Pause the tag queue?"]
    assert queue_row(page, "tag") == {"paused": "", "marker": True}, "cancelled: no form was sent"
    assert not queue.is_paused("tag")
    page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    with page.expect_navigation():
        page.click('button[value="pause:tag"]')
    assert len(dialogs) == 2 and queue.is_paused("tag"), "paused in the database"
    page.wait_for_function("document.querySelector('#earmark-queues tr[data-key=\"queue:tag\"] "
                           "[data-field=\"paused\"]').textContent === 'paused'")
    wait_live(page)
    with page.expect_navigation():
        page.click('button[value="resume:tag"]')
    assert not queue.is_paused("tag"), "resumed in the database"
    page.wait_for_function("document.querySelector('#earmark-queues tr[data-key=\"queue:tag\"] "
                           "[data-field=\"paused\"]').textContent === ''")
    wait_live(page)


def tag_eta_while_tagging(page, start_tagger) -> None:
    """The tag queue's "left" cell: "—" before any job is done, then times that change, then empty when done.

    Every text the cell takes is recorded in the page (a MutationObserver), so
    that no value is missed between two looks, however fast the tagger goes.
    """
    page.evaluate("""() => {
        const cell = document.querySelector('#earmark-queues tr[data-key="queue:tag"] [data-field="eta"]');
        window.__etas = [cell.textContent];
        new MutationObserver(() => window.__etas.push(cell.textContent))
            .observe(cell, {childList: true, characterData: true, subtree: true});
    }""")
    start_tagger()
    page.wait_for_function("""() => {
        const row = document.querySelector('#earmark-queues tr[data-key="queue:tag"]');
        return ['queued', 'running'].every(f => row.querySelector(`[data-field="${f}"]`).textContent === '0');
    }""", timeout=90_000)
    etas = page.evaluate("window.__etas")
    assert etas[0] == "—", f"no rate before the first tag job is done: {etas}"
    timed = [e for e in etas if e.endswith("min") or e.endswith(" h")]
    assert len(set(timed)) >= 2, f"the time left appeared and changed: {etas}"
    assert etas[-1] == "", f"nothing left, no time shown: {etas}"
    assert Track.objects.filter(state=Track.State.TAGGED).count() >= ETA_CLIPS + len(SCORES)


def fits_narrow(page, what: str) -> None:
    """At 375 px the page itself does not scroll sideways (its wide tables scroll inside their sections)."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= NARROW["width"] + OVERFLOW_TOLERANCE, f"{what} is {width} px wide at {NARROW['width']} px"


def breaks_no_words(page, what: str) -> None:
    """Nothing on the page's content is set to split words anywhere (long paths wrap at slashes or scroll)."""
    splitting = page.evaluate("""() => Array.from(document.querySelectorAll('#content *'))
        .filter(e => { const s = getComputedStyle(e); return s.wordBreak === 'break-all' || s.overflowWrap === 'anywhere'; })
        .map(e => e.tagName + (e.dataset.field ? `[data-field=${e.dataset.field}]` : ''))""")
    assert not splitting, f"{what} splits words in {splitting}"


def shoot(page, artifacts_dir: Path, name: str, scheme: str) -> None:
    """``name`` at 1440 px and at 375 px (checked for overflow), as loaded: resizing reloads nothing."""
    breaks_no_words(page, f"{name} ({scheme})")
    page.set_viewport_size(WIDE)
    page.screenshot(path=str(artifacts_dir / f"{name}-1440-{scheme}.png"), full_page=True)
    page.set_viewport_size(NARROW)
    fits_narrow(page, f"{name} ({scheme})")
    page.screenshot(path=str(artifacts_dir / f"{name}-375-{scheme}.png"), full_page=True)
    page.set_viewport_size(WIDE)


def plot_text_is_readable(page, scheme: str) -> None:
    """The charts' labels (server-made SVG) are dark on the light theme and light on the dark one."""
    rgb = page.evaluate("""() => getComputedStyle(document.querySelector('#content svg text')).fill
        .match(/\\d+/g).slice(0, 3).map(Number)""")
    brightness = sum(rgb) / 3
    assert (brightness > 180) if scheme == "dark" else (brightness < 100), (scheme, rgb)


def shoot_dashboard(page, artifacts_dir: Path, scheme: str) -> None:
    """The dashboard, live, its plots in the theme's colours, at both widths."""
    wait_live(page)
    theme = page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
    assert theme == (scheme == "dark")
    plot_text_is_readable(page, scheme)
    if scheme == "light":
        toggled_dark_reaches_the_plots(page)
    shoot(page, artifacts_dir, "dashboard", scheme)


def toggled_dark_reaches_the_plots(page) -> None:
    """The admin's theme toggle (``data-theme="dark"`` on a light system) darkens the plots too, not only the OS."""
    page.evaluate("document.documentElement.dataset.theme = 'dark'")
    plot_text_is_readable(page, "dark")
    page.evaluate("document.documentElement.dataset.theme = 'auto'")


def shoot_plots(page, base: str, artifacts_dir: Path, scheme: str) -> None:
    """The distribution of tags: readable in the theme, its charts shrunk to a phone's width."""
    page.goto(f"{base}/admin/dashboard/plots/")
    assert page.locator("#content svg").count() >= 2, "a chart per category written"
    plot_text_is_readable(page, scheme)
    shoot(page, artifacts_dir, "plots", scheme)


def shoot_failures(page, base: str, artifacts_dir: Path, scheme: str) -> None:
    """The failures page lists the file the scan could not read, and fits a phone."""
    page.goto(f"{base}/admin/failures/")
    table = page.inner_text("#failures")
    assert "broken.flac" in table and "sonata.flac" not in table, table
    shoot(page, artifacts_dir, "failures", scheme)


def favicon_is_served(page, base: str) -> None:
    """Every admin page links the SVG icon, and /favicon.ico leads to it (no 404 in the server's log)."""
    icon = page.get_attribute('link[rel="icon"]', "href")
    assert icon and icon.endswith(".svg"), icon
    response = page.request.get(f"{base}/favicon.ico")
    assert response.ok and response.headers["content-type"].startswith("image/svg"), response.status


def refused_without_permissions(context, base: str) -> None:
    """Staff with no permission logs in, and gets 403 on the dashboard, the event stream and the plots."""
    page = context.new_page()
    login(page, base, "nobody")
    for url in REFUSED:
        response = page.goto(f"{base}{url}")
        assert response.status == 403, (url, response.status)
    context.close()


def stream_closed_after_logout(context, dashboard, base: str) -> None:
    """Logging out in another tab closes the dashboard's open stream within a few seconds, for good."""
    wait_live(dashboard)
    other = context.new_page()
    other.goto(f"{base}/admin/")
    with other.expect_navigation():
        other.click("#logout-form button")
    dashboard.bring_to_front()
    dashboard.wait_for_function("document.getElementById('earmark-connection').textContent !== 'live'",
                                timeout=5_000)
    dashboard.wait_for_function("/^(disconnected|refused)/.test(document.getElementById('earmark-connection')"
                                ".textContent)", timeout=15_000)
