"""The Dagster UI over a real instance: every asset family in the graph, lineage from teacher_snapshot to
the most-downstream asset, and a materialized partition's metadata, driven by headless Debian chromium.

    bash scripts/test.sh nexus_assets_tests/ui          # ~1.5 min; screenshots in data/artifacts/screenshots/

A real vision chain (probe_dataset[image-probe] -> efficientnet-lite0 -> student_architecture[vision], the
tiny profile, ~30 s) is materialized first into a temp DAGSTER_HOME, then `dagster dev` serves that same
instance on a free port. The vision tower has a single teacher, so its student_architecture needs no
other teacher's features (the text tower would also need smollm2-135m: ~100 s more).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = REPO / "data" / "artifacts" / "screenshots"  # git-ignored
TEACHER, DATASET, TOWER = "efficientnet-lite0", "image-probe", "vision"
TARGET = "student_architecture"  # materialized with everything upstream of it


def _missing_browser() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is absent (apt-get install chromium, or bash scripts/setup.sh)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is absent (pip install -e '.[dev]')"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing_browser() is not None,
                                                       reason=_missing_browser() or "")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    return {**os.environ, "DAGSTER_HOME": str(home / "dagster_home"), "NEXUS_HOME": str(home / "artifacts"),
            "NEXUS_PROFILE": "tiny", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, asset graph) of `dagster dev` over an instance holding one real materialized chain."""
    import dagster as dg

    from nexus_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    chain = {TARGET} | {k.to_user_string() for k in graph.upstream_key_iterator(dg.AssetKey(TARGET))}
    home = tmp_path_factory.mktemp("ui")
    (home / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster_home" / "dagster.yaml")
    env = _env(home)
    run = subprocess.run([sys.executable, "-m", "nexus_assets.pipeline", "--select", *sorted(chain),
                          "--partition", DATASET, TEACHER, TOWER],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"pipeline failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"

    port = _free_port()
    log = open(home / "dagster_dev.log", "w")
    # its own session: `dagster dev` ignores SIGTERM when started from a script, so the teardown kills
    # the whole process group (webserver, daemon, code-server children)
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "dagster"), "dev", "-w", "workspace.yaml",
                             "-h", "127.0.0.1", "-p", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 90:
                    raise RuntimeError(f"dagster dev did not answer in 90 s:\n{(home / 'dagster_dev.log').read_text()}")
                time.sleep(0.5)
        yield url, graph
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            p = browser.new_page(viewport={"width": 1600, "height": 1000})
            p.set_default_timeout(30_000)
            yield p
        finally:
            browser.close()


def _open(page, url: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(url)
    page.wait_for_load_state("networkidle")
    skip = page.get_by_role("button", name="Skip")  # the first-visit "join the community" dialog
    try:
        skip.wait_for(timeout=1000 if getattr(page, "_nux_seen", False) else 4000)
        skip.click()
        page._nux_seen = True
    except PlaywrightTimeout:
        page._nux_seen = True


def _shown_as(name: str, shown: set[str]) -> bool:
    """Zoomed-out nodes shorten long names in the middle: `activati…_subspace`."""
    if name in shown:
        return True
    return any(s.count("…") == 1 and name.startswith(s.split("…")[0]) and name.endswith(s.split("…")[1])
               and len(name) > len(s) - 1 for s in shown)


def _graph_nodes(page, expected: set[str], tries: int = 24) -> set[str]:
    """Names of the expected assets drawn in the graph, plus every other name drawn.

    Full nodes carry the name in data-tooltip; zoomed-out (minimal) nodes only as possibly shortened text.
    The graph draws only the nodes inside the viewport, so it is zoomed out until every expected one shows."""
    js = """els => els.flatMap(e => [e.getAttribute('data-tooltip'), e.textContent])"""
    shown: set[str] = set()
    for i in range(tries):  # the graph lays out asynchronously
        shown = {n.strip() for n in page.eval_on_selector_all(
            "foreignObject [data-tooltip], foreignObject [class*='assetName']", js) if n}
        if all(_shown_as(n, shown) for n in expected):
            break
        zoom_out = page.locator("#zoom-slider-container button").last
        if i % 3 == 2 and zoom_out.count() and zoom_out.is_visible():
            zoom_out.click()
        page.wait_for_timeout(500)
    return {n for n in expected if _shown_as(n, shown)} | {n for n in shown if "…" not in n}


def _expand_all_groups(page) -> None:
    """The global graph starts with its groups collapsed: use the graph menu's "Expand all groups"."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for button in page.locator("button[class*='SVGViewport_iconButton']").all():
        if not button.is_visible():
            continue
        button.click(timeout=3000)
        try:
            page.get_by_text("Expand all groups", exact=True).filter(visible=True).first.click(timeout=1500)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    page.mouse.click(900, 950)  # fallback: the same command's shortcut, with the canvas focused
    page.keyboard.press("Alt+e")


def _keys(graph) -> set[str]:
    return {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}


def test_asset_graph_shows_every_asset_family(server, page):
    url, graph = server
    groups = sorted({graph.get(k).group_name for k in graph.get_all_asset_keys()})
    _open(page, f"{url}/asset-groups")
    names = _keys(graph)
    found = _graph_nodes(page, set(groups))
    assert set(groups) <= found, f"asset groups missing: {sorted(set(groups) - found)}"
    _expand_all_groups(page)
    found = _graph_nodes(page, names)
    page.screenshot(path=str(SCREENSHOTS / "asset-graph.png"))
    assert names <= found, f"missing from the asset graph: {sorted(names - found)}"


def test_lineage_runs_from_teacher_snapshot_to_the_most_downstream_asset(server, page):
    import dagster as dg

    url, graph = server
    start = dg.AssetKey("teacher_snapshot")
    downstream = {k.to_user_string() for k in graph.get(start).child_keys}
    frontier = set(graph.get(start).child_keys)
    while frontier:
        nxt = {c for k in frontier for c in graph.get(k).child_keys}
        downstream |= {k.to_user_string() for k in nxt}
        frontier = nxt
    sinks = {k for k in downstream if not graph.get(dg.AssetKey(k)).child_keys}
    assert "student_architecture" in downstream and sinks, "teacher_snapshot feeds the profiling family"

    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    _open(page, f"{url}/assets/teacher_snapshot?view=lineage&lineageScope=downstream")
    all_depth = page.get_by_role("button", name="All", exact=True)
    try:  # the depth control renders after the page settles: on a busy machine it was not there yet
        all_depth.first.wait_for(timeout=10_000)
    except PlaywrightTimeout:
        pass  # a UI without a depth control draws the whole lineage
    if all_depth.count() and all_depth.first.is_enabled():
        all_depth.first.click()
    found = _graph_nodes(page, downstream | {"teacher_snapshot"})
    page.screenshot(path=str(SCREENSHOTS / "teacher_snapshot-downstream.png"))
    assert downstream | {"teacher_snapshot"} <= found, f"downstream missing: {sorted(downstream - found)}"
    upstream_only = _keys(graph) - downstream - {"teacher_snapshot"}
    assert not (found & upstream_only), f"not downstream of teacher_snapshot, yet drawn: {found & upstream_only}"


@pytest.mark.parametrize("asset, partition, expect", [
    ("student_architecture", TOWER, ["reasoning", "carve_report", "carved from efficientnet-lite0", "lora_rank"]),
    ("activation_subspace", TEACHER, ["intrinsic_dims", "explained_variance", "features"]),
    ("teacher_features", TEACHER, ["cache_key", "rows_per_s", "layer_streamed"]),
])
def test_materialized_partition_metadata_shows(server, page, asset, partition, expect):
    url, _ = server
    _open(page, f"{url}/assets/{asset}?view=events&partition={partition}")
    page.get_by_text(f"Partition {partition} materialized").first.wait_for()
    text = page.inner_text("body")
    page.screenshot(path=str(SCREENSHOTS / f"{asset}-{partition}-metadata.png"), full_page=True)
    missing = [e for e in expect if e not in text]
    assert not missing, f"{asset}[{partition}] page lacks {missing}"


def test_validation_report_metadata_when_defined(server, page):
    url, graph = server
    import dagster as dg

    if dg.AssetKey("validation_report") not in graph.get_all_asset_keys():
        pytest.skip("validation_report is not in nexus_assets.definitions yet")
    node = graph.get(dg.AssetKey("validation_report"))
    _open(page, f"{url}/assets/validation_report")
    # not materialized here (it needs trained towers): its overview must still load with its description
    if node.description:
        page.get_by_text(node.description.split("\n")[0][:40]).first.wait_for()
    page.screenshot(path=str(SCREENSHOTS / "validation_report.png"), full_page=True)
