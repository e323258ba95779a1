"""report.html in a real browser: headless Chromium renders it with every image loaded.

Chromium is a test dependency that scripts/setup.sh installs (as root, from the system's
packages), so a missing browser fails these tests rather than skipping them."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from codis.report import build_report

# Appended to a copy of the page: once the page has loaded, each image records whether it
# decoded, and the body how many images it saw. A broken image is added as a control.
_PROBE = """<img id="broken-control" alt="control" src="data:image/png;base64,AAAA">
<script>
window.addEventListener("load", () => {
  for (const image of document.images)
    image.setAttribute("data-loaded", String(image.complete && image.naturalWidth > 0));
  document.body.setAttribute("data-images", String(document.images.length));
});
</script>
"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Chromium is not installed: scripts/setup.sh installs it as root "
                    "(apt-get install chromium)")
    return found


def rendered_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after headless Chromium loaded it and ran its scripts."""
    result = subprocess.run(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_report_html_renders_with_every_image_loaded(tmp_path, report_inputs):
    page = build_report(report_inputs(), tmp_path / "out")["html"]
    text = page.read_text()
    shown = len(re.findall(r"<img\b", text))
    assert shown == 5  # loss curves, codis's codebook, two retrieval strips, Grad-CAM
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", _PROBE + "</body>"))

    dom = rendered_dom(probed, tmp_path / "profile")

    assert re.search(r'<body[^>]* data-images="6"', dom), "the probe did not run after load"
    assert "<h1>CODIS reproduction report: recipe demo</h1>" in dom
    assert dom.count("<table>") == text.count("<table>") > 0
    images = re.findall(r"<img\b[^>]*>", dom)
    control = [image for image in images if 'id="broken-control"' in image]
    assert len(control) == 1 and 'data-loaded="false"' in control[0]  # the probe can tell
    loaded = [image for image in images if image not in control]
    assert len(loaded) == shown and all('data-loaded="true"' in image for image in loaded)
