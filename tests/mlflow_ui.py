"""Headless-browser checks of the MLflow 3 UI (written against MLflow 3.17.2), for tests/test_mlflow_ui.py.

Starts ``mlflow ui`` on a free port against a backend store, drives Debian's Chromium
through Selenium + Debian's chromedriver (never Selenium Manager, so nothing is
downloaded), waits for DOM markers, records how long each page took and saves a
PNG screenshot per check.

Requirements (`.ci/run` installs the first, the dev extra the second):
    apt-get install -y chromium chromium-driver      # /usr/bin/chromium, /usr/bin/chromedriver
    pip install selenium

Usage, on a project with runs (e.g. for the README's screenshots):
    python tests/mlflow_ui.py --store . --shots docs/ui --runs RUN_NAME ... --sweep dcgan-sweep
or from Python:
    with MlflowUIBrowser("sqlite:////abs/path/mlflow.db", shots_dir="shots") as ui:
        ui.check_runs_table("dcgan-mnist", ["train-0", "train-1"], metrics=["eval_fid"],
                            params=["train.lr_g"])

Gotchas encoded here (all found empirically on MLflow 3.17.2):
* The experiment page does NOT follow the experiment tag ``mlflow.experimentKind`` any
  more: a feature flag makes the kind follow the global "GenAI | Model training" toggle
  (``workflowType``), whose default is ``genai`` -> ``#/experiments/<id>`` redirects to
  ``#/experiments/<id>/overview/usage?workflowType=genai``.  Fix: put
  ``workflowType=machine_learning`` in the URL query, or set localStorage
  ``mlflow.workflowType_v1 = "machine_learning"`` (JSON string) before navigating.
  The URL parameter is *not* persisted, only the toggle click / localStorage is.
* The runs table shows no metric/param columns by default.  Columns are stored in
  localStorage ``MLflowLocalStorage-1.1-ExperimentPage-["<exp_id>"]-ReactComponentState``
  (``selectedColumns``: ``metrics.`name` `` / ``params.`name` ``), which we pre-seed.
* The table is ag-grid: cells/headers carry ``col-id`` = ``metrics.`eval_fid` ``,
  ``params.`train.lr_g` ``, ``attributes.`Run Name` ``; child runs are collapsed under
  their parent and are not in the DOM until the parent row's expander button is clicked.
* The MLflow Assistant side panel auto-opens on first load and eats ~400 px of width;
  localStorage ``mlflow.assistant.panelOpen_v1=false`` +
  ``mlflow.assistant.fab.autoOpenedOnFirstLoad_v1=true`` keeps it closed.
* Use a wide window (1920x1200): ag-grid virtualises columns and chart cards render lazily.
* MLflow 3.18 changed the image card: it fetches the step's compressed image itself and shows it
  as a ``blob:`` URL, where 3.17 put the artifact's own URL (with ``+step+<n>+`` in it) in ``src``.
  The check compares the bytes the card shows with the files logged at the step, which holds for both.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # run as `python tests/mlflow_ui.py`: tests.servers is found from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import free_port  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def bt(name: str) -> str:
    """Column key as the MLflow UI spells it: metrics.`x` / params.`x`."""
    kind, _, key = name.partition(":")
    return f"{kind}.`{key}`"


@dataclass
class CheckResult:
    name: str
    url: str
    ok: bool
    seconds: float
    waited_for: str
    screenshot: str | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


class CheckFailed(AssertionError):
    pass


class MlflowUIBrowser:
    def __init__(self, backend_store_uri: str, shots_dir: str | os.PathLike = "shots", *,
                 mlflow_cmd: list[str] | None = None, port: int | None = None,
                 window=(1920, 1200), timeout: float = 30.0, server_timeout: float = 90.0,
                 workers: int = 1, server_log: str | None = None, base_url: str | None = None):
        self.backend_store_uri = backend_store_uri
        self.shots = Path(shots_dir)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.mlflow_cmd = mlflow_cmd or [str(Path(sys.executable).with_name("mlflow"))]
        self.port = port or free_port()
        self.base = base_url.rstrip("/") + "/" if base_url else f"http://127.0.0.1:{self.port}/"
        self.external = base_url is not None  # reuse a running server, start none
        self.window = window
        self.timeout = timeout
        self.server_timeout = server_timeout
        self.workers = workers
        self.server_log = server_log or str(self.shots / "mlflow-ui.log")
        self.proc: subprocess.Popen | None = None
        self.driver = None
        self.profile_dir: str | None = None
        self.timings: dict[str, float] = {}
        self.results: list[CheckResult] = []

    # ------------------------------------------------------------------ lifecycle
    def start_server(self):
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                   MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        cmd = [*self.mlflow_cmd, "ui", "--backend-store-uri", self.backend_store_uri,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]
        t0 = time.monotonic()
        self._log = open(self.server_log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = t0 + self.server_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow ui exited rc={self.proc.returncode}; see {self.server_log}")
            try:
                with urllib.request.urlopen(self.base + "health", timeout=2) as r:
                    if r.status == 200:
                        self.timings["server_start"] = time.monotonic() - t0
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow ui not healthy after {self.server_timeout}s; see {self.server_log}")

    def start_browser(self):
        os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager must never download
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in CHROME_FLAGS:
            opts.add_argument(a)
        self.profile_dir = tempfile.mkdtemp(prefix="mlflow-ui-chromium-")
        opts.add_argument(f"--user-data-dir={self.profile_dir}")
        opts.add_argument(f"--window-size={self.window[0]},{self.window[1]}")
        t0 = time.monotonic()
        # An explicit driver path makes Selenium skip Selenium Manager entirely.
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.driver.set_page_load_timeout(self.timeout)
        self.timings["browser_start"] = time.monotonic() - t0
        # localStorage is per origin: open a cheap same-origin URL and seed the UI prefs.
        self.driver.get(self.base + "health")
        self.set_local_storage({
            "mlflow.workflowType_v1": json.dumps("machine_learning"),
            "mlflow.assistant.panelOpen_v1": "false",
            "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        })

    def start(self):
        if not self.external:
            self.start_server()
        self.start_browser()
        return self

    def close(self):
        if self.driver is not None:
            try:
                self.driver.quit()
            except Exception:
                pass
            self.driver = None
        if self.profile_dir:
            shutil.rmtree(self.profile_dir, ignore_errors=True)
        if self.proc is not None and self.proc.poll() is None:
            try:  # the server runs in its own session: stop that process group only
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ REST helpers
    def api(self, path: str, payload: dict | None = None, **query):
        url = self.base + "api/2.0/mlflow/" + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def experiment_id(self, name: str) -> str:
        return self.api("experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]

    def run_id(self, experiment_id: str, run_name: str) -> str:
        res = self.api("runs/search", {"experiment_ids": [experiment_id],
                                       "filter": f"attributes.run_name = '{run_name}'", "max_results": 5})
        runs = res.get("runs", [])
        if not runs:
            raise LookupError(f"no run named {run_name!r} in experiment {experiment_id}")
        return runs[0]["info"]["run_id"]

    # ------------------------------------------------------------------ browser helpers
    def set_local_storage(self, items: dict[str, str]):
        self.driver.execute_script(
            "for (const [k, v] of Object.entries(arguments[0])) localStorage.setItem(k, v);", items)

    def seed_runs_table(self, experiment_id: str, columns: list[str], expanded: list[str] = ()):
        """Pre-select runs-table columns (e.g. 'metrics:eval_fid', 'params:train.lr_g')."""
        key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState'
        cur = self.driver.execute_script("return localStorage.getItem(arguments[0])", key)
        state = json.loads(cur) if cur else {}
        state["selectedColumns"] = [bt(c) for c in columns]
        if expanded:
            state["runsExpanded"] = {rid: True for rid in expanded}
        self.set_local_storage({key: json.dumps(state)})

    def add_columns_via_ui(self, names: list[str]):
        """Alternative to seed_runs_table(): tick columns in the runs table's "Columns"
        dropdown (must already be on the runs table).  Names are shown without prefix,
        so a metric and a param with the same name are ambiguous here."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        self.click_js("//button[.//text()[normalize-space()='Columns']]", xpath=True)
        self.wait_selectors(['input[placeholder="Search columns"]'])
        box = self.driver.find_element(By.CSS_SELECTOR, 'input[placeholder="Search columns"]')
        for n in names:
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(n)
            xp = f"//input[@placeholder='Search columns']/ancestor::*[.//*[@role='checkbox' or @type='checkbox']][1]//*[normalize-space(text())='{n}']"
            self.wait_js("return document.evaluate(arguments[0], document, null, 9, null).singleNodeValue !== null;",
                         xp, what=f"column {n!r} in Columns dropdown")
            self.click_js(xp, xpath=True)
        box.send_keys(Keys.ESCAPE)

    def goto(self, hash_path: str):
        url = self.base + hash_path
        self.driver.get(url)
        return url

    def wait_js(self, predicate_js: str, *args, timeout: float | None = None, what: str = ""):
        """Poll a JS expression (body of a function returning truthy) until truthy.
        JS predicates avoid stale-element errors while React re-renders."""
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.driver.execute_script(predicate_js, *args)
                if last:
                    return last
            except Exception as e:  # page mid-navigation
                last = e
            time.sleep(0.2)
        raise CheckFailed(f"timed out after {timeout}s waiting for {what or predicate_js[:80]} (last={last!r})")

    def logged_images(self, run_id: str, key: str, step: str) -> dict[str, str]:
        """sha256 -> name of each file MLflow's log_image wrote for `key` at `step` (the PNG and its
        compressed copy), downloaded from the server as the UI would."""
        listing = self.api("artifacts/list?" + urllib.parse.urlencode({"run_id": run_id, "path": "images"})).get("files", [])
        found = {}
        for f in listing:
            if f["path"].startswith(f"images/{key}+step+{step}+") and not f.get("is_dir"):
                query = urllib.parse.urlencode({"path": f["path"], "run_uuid": run_id})
                with urllib.request.urlopen(self.base + "get-artifact?" + query, timeout=10) as r:
                    found[hashlib.sha256(r.read()).hexdigest()] = f["path"]
        if not found:
            raise CheckFailed(f"the run logged no {key!r} image at step {step}: {[f['path'] for f in listing]}")
        return found

    def shown_image(self) -> tuple[str, str] | None:
        """(src, sha256 of the bytes) of the loaded img.rc-image-img, read back through the page itself."""
        shown = self.driver.execute_async_script("""const done=arguments[arguments.length-1];
            const i=document.querySelector('img.rc-image-img');
            if(!(i && i.complete && i.naturalWidth>0)) { done(null); return; }
            fetch(i.src).then(r=>r.arrayBuffer()).then(b=>{ let s=''; const u=new Uint8Array(b);
                for(let k=0;k<u.length;k+=8192) s+=String.fromCharCode(...u.subarray(k,k+8192));
                done([i.getAttribute('src'), btoa(s)]); }).catch(e=>done(null));""")
        return shown and (shown[0], hashlib.sha256(base64.b64decode(shown[1])).hexdigest())

    def wait_image(self, run_id: str, key: str, step: str, timeout: float | None = None) -> str:
        """Wait until the image card shows one of the files logged for `key` at `step`; returns its name."""
        want = self.logged_images(run_id, key, step)
        deadline = time.monotonic() + (timeout or self.timeout)
        shown = None
        while time.monotonic() < deadline:
            shown = self.shown_image()
            if shown and shown[1] in want:
                return want[shown[1]]
            time.sleep(0.2)
        raise CheckFailed(f"the image card did not show a {key!r} image logged at step {step} in {timeout or self.timeout}s:"
                          f" it showed {shown and shown[0]!r} (sha256 {shown and shown[1]}), the step's files are"
                          f" {sorted(want.values())}")

    def wait_texts(self, texts: list[str], root_css: str = "body", timeout: float | None = None):
        js = ("const r=document.querySelector(arguments[0]); if(!r) return false;"
              "const t=r.innerText; return arguments[1].every(s => t.includes(s));")
        return self.wait_js(js, root_css, list(texts), timeout=timeout, what=f"texts {texts} in {root_css}")

    def wait_selectors(self, selectors: list[str], timeout: float | None = None):
        js = "return arguments[0].every(s => document.querySelector(s) !== null);"
        return self.wait_js(js, list(selectors), timeout=timeout, what=f"selectors {selectors}")

    def click_js(self, css_or_xpath: str, xpath: bool = False):
        from selenium.webdriver.common.by import By
        el = self.driver.find_element(By.XPATH if xpath else By.CSS_SELECTOR, css_or_xpath)
        self.driver.execute_script("arguments[0].scrollIntoView({block:'center'}); arguments[0].click();", el)
        return el

    def shot(self, name: str) -> str:
        path = str(self.shots / f"{name}.png")
        time.sleep(0.5)  # let charts/animations settle before the screenshot
        self.driver.save_screenshot(path)
        return path

    def _run_check(self, name, fn, *a, **kw) -> CheckResult:
        t0 = time.monotonic()
        try:
            url, waited, extra = fn(*a, **kw)
            res = CheckResult(name, url, True, time.monotonic() - t0, waited, extra=extra)
        except Exception as e:
            res = CheckResult(name, self.driver.current_url, False, time.monotonic() - t0, "",
                              error=f"{type(e).__name__}: {e}")
        try:
            res.screenshot = self.shot(name if res.ok else name + "-FAILED")
        except Exception:
            pass
        self.results.append(res)
        return res

    # ------------------------------------------------------------------ checks
    def check_runs_table(self, experiment: str, run_names: list[str], metrics=(), params=(), via: str = "storage"):
        """(a) runs table shows the runs and metric/param columns (dotted param names too).
        via="storage": pre-seed the selected columns in localStorage (fast, no clicks);
        via="ui": tick them in the "Columns" dropdown like a user would."""
        def body():
            eid = self.experiment_id(experiment)
            if via == "storage":
                self.seed_runs_table(eid, [f"metrics:{m}" for m in metrics] + [f"params:{p}" for p in params])
            url = self.goto(f"#/experiments/{eid}/runs?workflowType=machine_learning")
            if via == "ui":
                self.wait_texts(list(run_names), ".ag-root")
                self.add_columns_via_ui(list(metrics) + list(params))
            sels = [f'.ag-header-cell[col-id="{bt("metrics:" + m)}"]' for m in metrics]
            sels += [f'.ag-header-cell[col-id="{bt("params:" + p)}"]' for p in params]
            self.wait_texts(list(run_names), ".ag-root")
            want = {bt("metrics:" + m): m for m in metrics} | {bt("params:" + p): p for p in params}
            self.wait_headers(want)
            # values of the first metric column, keyed by run name (visible top-level rows)
            vals = self.column_values(bt("metrics:" + metrics[0])) if metrics else []
            return url, f"run-name texts {list(run_names)} in .ag-root + header cells {sels} (texts {list(want.values())})", {"rows": vals}
        return self._run_check("a_runs_table", body)

    def wait_headers(self, want: dict[str, str]) -> None:
        """Wait until every column id in `want` has a header cell showing its text. ag-grid virtualises
        columns (headers outside the viewport are not in the DOM): remember each wanted header seen
        and scroll right between polls; scroll back to the left at the end."""
        self.driver.execute_script("window.__mlflowSeen = {};")
        self.wait_js("""
                const want=arguments[0], seen=window.__mlflowSeen;
                for(const h of document.querySelectorAll('.ag-header-cell[col-id]')){
                  const id=h.getAttribute('col-id'); if(id in want) seen[id]=h.innerText.trim();}
                if(Object.keys(want).every(k => k in seen && seen[k].includes(want[k]))) return true;
                const v=document.querySelector('.ag-body-horizontal-scroll-viewport');
                if(v && v.scrollWidth>v.clientWidth){
                  v.scrollLeft = v.scrollLeft+v.clientWidth-5 >= v.scrollWidth ? 0 : v.scrollLeft+Math.max(100, v.clientWidth/2);
                  v.dispatchEvent(new Event('scroll'));}
                return false;""", want, what=f"header cells with texts {list(want.values())}")
        self.driver.execute_script("""const v=document.querySelector('.ag-body-horizontal-scroll-viewport');
                                      if(v){v.scrollLeft=0; v.dispatchEvent(new Event('scroll'));}""")

    def check_view(self, name: str, hash_path: str, want: dict[str, str], run_names: list[str], value_col: str):
        """An address the pipeline prints (a shared view): its runs, its columns, `value_col`'s values in row order."""
        def body():
            url = self.goto(hash_path)
            self.wait_texts(list(run_names), ".ag-root")
            self.wait_headers(want)
            return url, f"runs {run_names} and header cells {list(want.values())}", {"rows": self.column_values(value_col)}
        return self._run_check(name, body)

    def column_values(self, col: str) -> list[dict[str, str]]:
        """The visible top-level rows, top to bottom: run name and the value in column `col`."""
        return self.driver.execute_script(
                """const out={}; const col=arguments[0];
                   document.querySelectorAll('.ag-center-cols-container .ag-row, .ag-pinned-left-cols-container .ag-row')
                   .forEach(r=>{const i=r.getAttribute('row-index'); out[i]=out[i]||{};
                     const n=r.querySelector('[col-id="attributes.`Run Name`"] a'); if(n) out[i].run=n.innerText.trim();
                     const c=r.querySelector(`[col-id="${col}"]`); if(c) out[i].value=c.innerText.trim();});
                   return Object.keys(out).sort((a,b)=>a-b).map(k=>out[k]);""", col)

    def check_run_metrics(self, experiment: str, run_name: str, metrics=("d_loss", "g_loss"),
                          image_key: str | None = "samples"):
        """(b) a run's Model metrics tab: line charts per metric and the image card with its
        step slider; moves the slider to the last step and checks the image changes."""
        def body():
            from selenium.webdriver.common.keys import Keys
            eid = self.experiment_id(experiment)
            rid = self.run_id(eid, run_name)
            url = self.goto(f"#/experiments/{eid}/runs/{rid}/model-metrics?workflowType=machine_learning")
            titles = list(metrics) + ([image_key] if image_key else [])
            self.driver.execute_script("window.__cardsSeen = {};")
            # Chart cards render lazily (only near the viewport): on every poll, check the
            # wanted cards and scroll the first wanted-but-unrendered card (or, if a title is
            # not in the DOM yet, the grid's scroll container) further down.
            self.wait_js("""
                const want=arguments[0], img=arguments[1];
                const grid=document.querySelector('[data-testid="draggable-chart-cards-grid"]');
                if(!grid) return false;
                const cards=[...document.querySelectorAll('[data-testid="experiment-view-compare-runs-card"]')];
                const title=c=>c.innerText.split('\\n')[0].trim();
                const ready=c=> {
                  if(title(c)!==img) return !!c.querySelector('.js-plotly-plot .main-svg');
                  if(c.querySelector('img') || c.innerText.includes('No image logged at this step')) return true;
                  // the image sits below the run's legend (all its params) in a scrolled box: scroll to it
                  for(const e of c.querySelectorAll('*')) if(e.scrollHeight>e.clientHeight+1 && /auto|scroll/.test(getComputedStyle(e).overflowY)) e.scrollTop=e.scrollHeight;
                  return false;};
                // The grid renders only the cards near the viewport: a chart once seen drawn counts; the
                // image card must be drawn now (the slider is worked on next).
                const seen = window.__cardsSeen = window.__cardsSeen || {};
                const missing=[];
                for(const w of want){const c=cards.find(c=>title(c)===w);
                  if(c && ready(c)) { if(w!==img) seen[w]=true; continue; }
                  if(!seen[w]) missing.push([w,c]);}
                if(!missing.length) return true;
                const c=missing.find(m=>m[1]);
                if(c) c[1].scrollIntoView({block:'center'}); else {
                  let sc=grid; while(sc && !(sc.scrollHeight>sc.clientHeight+1 && /auto|scroll/.test(getComputedStyle(sc).overflowY))) sc=sc.parentElement;
                  // at the bottom, give the last cards a few polls to render before starting over
                  if(sc){ const atBottom = sc.scrollTop+sc.clientHeight >= sc.scrollHeight-2;
                    window.__bottomPolls = atBottom ? (window.__bottomPolls||0)+1 : 0;
                    if(!atBottom) sc.scrollTop = Math.min(sc.scrollTop+sc.clientHeight*0.8, sc.scrollHeight);
                    else if(window.__bottomPolls > 10) sc.scrollTop = 0; }
                }
                return false;""", titles, image_key or "", what=f"rendered chart cards {titles}")
            extra = {"run_id": rid}
            waited = f"cards[data-testid=experiment-view-compare-runs-card] titled {titles}, each with .js-plotly-plot .main-svg (image card: img)"
            if image_key:
                self.wait_selectors(['[role="slider"]'])
                thumb = self.driver.find_element("css selector", '[role="slider"]')
                vmax = thumb.get_attribute("aria-valuemax")
                self.driver.execute_script("arguments[0].scrollIntoView({block:'center'})", thumb)
                # Radix slider: ArrowRight jumps to the next *logged* step (End does nothing),
                # so step through and record every step the image card offers.
                self.driver.execute_script("arguments[0].focus()", thumb)
                steps = [thumb.get_attribute("aria-valuenow")]
                for _ in range(200):
                    if steps[-1] == vmax:
                        break
                    thumb.send_keys(Keys.ARROW_RIGHT)
                    prev = steps[-1]
                    now = self.wait_js("""const t=document.querySelector('[role="slider"]');
                                          const v=t && t.getAttribute('aria-valuenow'); return v!==arguments[0] && v;""",
                                       prev, timeout=5, what="slider to move")
                    steps.append(now)
                # The card shows a step's image under a URL of its own or (MLflow 3.18) as a blob: URL it
                # fetched itself, so compare the bytes it shows with the files logged at that step; then one
                # step back, where the image must change to that step's.
                shown = {vmax: self.wait_image(rid, image_key, vmax)}
                thumb.send_keys(Keys.ARROW_LEFT)
                back = self.wait_js("""const t=document.querySelector('[role="slider"]');
                                       const v=t && t.getAttribute('aria-valuenow'); return v!==arguments[0] && v;""",
                                    vmax, timeout=5, what="slider to move back")
                shown[back] = self.wait_image(rid, image_key, back)
                extra["images"] = shown
                self.driver.execute_script("document.querySelector('img.rc-image-img').scrollIntoView({block:'center'})")
                extra.update(steps=steps, slider_max=vmax)
                waited += (f"; [role=slider] ArrowRight until aria-valuenow == {vmax}, img.rc-image-img shows the bytes"
                           f" of a file logged at step {vmax}; ArrowLeft, it shows one logged at step {back}")
            return url, waited, extra
        return self._run_check("b_run_metrics", body)

    def check_run_artifact_image(self, experiment: str, run_name: str, folder="images", step: int | None = None):
        """(b2) Artifacts tab: open the images folder and preview one logged image
        (the one logged at `step` if given; log_image names files <key>+step+<n>+timestamp+...)."""
        def body():
            eid = self.experiment_id(experiment)
            rid = self.run_id(eid, run_name)
            url = self.goto(f"#/experiments/{eid}/runs/{rid}/artifacts?workflowType=machine_learning")
            self.wait_texts([folder, "Select a file to preview"])
            self.click_js(f"//*[normalize-space(text())='{folder}']", xpath=True)
            from selenium.webdriver.common.by import By
            # tree labels are truncated by CSS, but the DOM text is the full file name
            cond = "contains(., '.png')" + (f" and contains(., '+step+{step}+')" if step is not None else "")
            xp = f"//*[text()[{cond}]]"
            self.wait_js("return document.evaluate(arguments[0], document, null, 9, null).singleNodeValue !== null;",
                         xp, what="a .png file in the tree")
            el = self.driver.find_element(By.XPATH, xp)
            name = el.text.strip() or el.get_attribute("textContent").strip()
            self.driver.execute_script("arguments[0].scrollIntoView({block:'center'}); arguments[0].click();", el)
            # the preview pane fetches the file and shows it as a blob: URL in img.rc-image-img
            self.wait_texts([f"{folder}/{name}"])
            self.wait_js("""return [...document.querySelectorAll('img.rc-image-img')].some(i =>
                              i.src.startsWith('blob:') && i.complete && i.naturalWidth>0);""",
                         what="artifact <img> preview loaded")
            return url, (f"click '{folder}', click file '{name}'; wait text '{folder}/{name}' and "
                         "img.rc-image-img[src^=blob:] loaded"), {"file": name}
        return self._run_check("b2_run_artifacts", body)

    def check_nested_children(self, experiment: str, parent: str, children: list[str], name="c_sweep_children"):
        """(c) the parent row groups its children: hidden until its expander is clicked."""
        def body():
            eid = self.experiment_id(experiment)
            url = self.goto(f"#/experiments/{eid}/runs?workflowType=machine_learning")
            self.wait_texts([parent], ".ag-root")
            before = self.driver.execute_script(
                "const t=document.querySelector('.ag-root').innerText; return arguments[0].filter(c=>t.includes(c));",
                list(children))
            if before:  # already expanded (state persisted in localStorage) - collapse first
                raise CheckFailed(f"children visible before expanding: {before}")
            xp = (f"//div[@role='gridcell'][.//a[normalize-space()='{parent}']]"
                  "//button[contains(@data-component-id,'runnamecellrenderer')]")
            self.click_js(xp, xpath=True)
            self.wait_texts(list(children), ".ag-root")
            order = self.driver.execute_script(
                """const rows=[...document.querySelectorAll('.ag-pinned-left-cols-container .ag-row, .ag-center-cols-container .ag-row')]
                     .filter(r=>r.querySelector('[col-id="attributes.`Run Name`"] a'))
                     .sort((a,b)=>+a.getAttribute('row-index')-+b.getAttribute('row-index'));
                   return rows.map(r=>r.querySelector('[col-id="attributes.`Run Name`"] a').innerText.trim());""")
            return url, f"click expander button in '{parent}' row; wait texts {children}", {"row_order": order}
        return self._run_check(name, body)

    def check_registered_model(self, model: str, alias: str = "champion", versions=("1", "2"),
                               alias_version: str | None = None):
        """(d) registered model page lists the versions and shows the alias (on alias_version's row)."""
        def body():
            url = self.goto(f"#/models/{urllib.parse.quote(model)}")
            self.wait_texts([model, alias] + [f"Version {v}" for v in versions])
            waited = f"texts {[model, alias] + [f'Version {v}' for v in versions]}"
            extra = {}
            if alias_version is not None:
                row = self.wait_js("""const a=[...document.querySelectorAll('a')].find(a=>a.innerText.trim()===arguments[0]);
                                      const r=a && a.closest('tr,[role=row]'); return r && r.innerText;""",
                                   f"Version {alias_version}", what=f"row of Version {alias_version}")
                if alias not in row:
                    raise CheckFailed(f"alias {alias!r} not in row of Version {alias_version}: {row!r}")
                extra["alias_row"] = " | ".join(row.split("\n"))
                waited += f"; '@ {alias}' inside the row (tr/[role=row]) of link 'Version {alias_version}'"
            return url, waited, extra
        return self._run_check("d_registered_model", body)

    def report(self) -> str:
        lines = [f"server start {self.timings.get('server_start', float('nan')):.1f}s, "
                 f"browser start {self.timings.get('browser_start', float('nan')):.1f}s"]
        for r in self.results:
            lines.append(f"[{'OK' if r.ok else 'FAIL'}] {r.name} {r.seconds:.1f}s {r.url}\n"
                         f"    waited for: {r.waited_for}\n    screenshot: {r.screenshot}"
                         + (f"\n    error: {r.error}" if r.error else "")
                         + (f"\n    extra: {json.dumps(r.extra)[:600]}" if r.extra else ""))
        return "\n".join(lines)


def browser_available() -> str | None:
    """None when Chromium, chromedriver and Selenium are here; else why not (a skip reason)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return f"needs {', '.join(missing)} (apt-get install chromium chromium-driver)" if missing else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="directory holding mlflow.db (or a full sqlite:/// URI)")
    ap.add_argument("--shots", default="shots")
    ap.add_argument("--experiment", default="dcgan-mnist")
    ap.add_argument("--runs", nargs="+", required=True, help="training run names to look for")
    ap.add_argument("--sweep", help="a sweep's parent run name: check it groups its children")
    ap.add_argument("--model", default="dcgan-mnist-generator")
    a = ap.parse_args(argv)
    uri = a.store if a.store.startswith("sqlite:") else f"sqlite:///{Path(a.store).resolve()}/mlflow.db"
    with MlflowUIBrowser(uri, a.shots) as ui:
        ui.check_runs_table(a.experiment, a.runs, metrics=["eval_fid"], params=["train.lr_g", "train.batch_size"])
        ui.check_run_metrics(a.experiment, a.runs[0], metrics=("d_loss", "g_loss", "d_acc"), image_key="samples")
        if a.sweep:
            ui.check_nested_children(a.experiment, a.sweep, [f"{a.sweep} #0"])
        ui.check_registered_model(a.model, "champion", ("1",))
        print(ui.report())
        return 0 if all(r.ok for r in ui.results) else 1


if __name__ == "__main__":
    sys.exit(main())
