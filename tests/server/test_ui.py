"""The auditors' web page as files: served without a key, with its security headers, nothing from elsewhere."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.routes.ui import ASSETS, UI_DIR
from server.settings import Settings
from tests.server.helpers import MAX_TOKENS_LIMIT, assert_error

REPO = Path(__file__).resolve().parents[2]
# The one absolute URL the files may hold: SVG's namespace, a name that is never fetched.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("ui"), max_tokens_limit=MAX_TOKENS_LIMIT, auth="keys")
    with TestClient(create_app(settings, tiny_model)) as client:
        yield client


def test_page_needs_no_key(client):
    response = client.get("/ui/")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="app.js">' in response.text
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_every_asset_is_served_with_its_type(client):
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".html": "text/html; charset=utf-8"}
    for name, path in ASSETS.items():
        response = client.get(f"/ui/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == types[path.suffix]
        assert response.content == path.read_bytes()


@pytest.mark.parametrize(("path", "location"), [("/ui", "ui/"), ("/ui?judgment=x&heat=y", "ui/?judgment=x&heat=y")])
def test_bare_path_redirects_relatively(client, path, location):
    # Relative, so that the browser keeps whatever prefix a proxy serves the page under.
    response = client.get(path, follow_redirects=False)

    assert response.status_code == 307
    assert response.headers["location"] == location


@pytest.mark.parametrize("name", ["nope.js", "index.htm", "style.css.bak"])
def test_unknown_file_is_404(client, name):
    assert_error(client.get(f"/ui/{name}"), 404, type="not_found_error", param="name", code="not_found",
                 fragments=("open /ui/",))


@pytest.mark.parametrize("path", ["/ui/..%2Fapp.py", "/ui/%2E%2E%2Froutes%2Fui.py", "/ui/../routes/ui.py"])
def test_paths_outside_the_page_are_404(client, path):
    response = client.get(path)

    assert response.status_code == 404
    assert "import" not in response.text


def test_page_is_served_under_root_path(tmp_path, tiny_model):
    settings = Settings(data_dir=tmp_path, max_tokens_limit=MAX_TOKENS_LIMIT, root_path="/tracehead")
    with TestClient(create_app(settings, tiny_model)) as client:
        assert client.get("/tracehead/ui/app.js").status_code == 200
        assert client.get("/tracehead/ui", follow_redirects=False).headers["location"] == "ui/"


def test_files_load_nothing_from_elsewhere():
    for path in UI_DIR.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"""(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s"'`)]*""", text))
        assert urls <= {SVG_NAMESPACE}, f"{path.name} refers to {urls - {SVG_NAMESPACE}}"
        assert "@import" not in text, f"{path.name} imports a style sheet"
        assert "url(" not in text, f"{path.name} loads a resource with url()"


def test_module_imports_resolve_to_served_files():
    for path in UI_DIR.glob("*.js"):
        for imported in re.findall(r'from "\./([\w.-]+)"', path.read_text()):
            assert imported in ASSETS, f"{path.name} imports {imported}, which /ui/ does not serve"
    index = (UI_DIR / "index.html").read_text()
    for referenced in re.findall(r'(?:src|href)="([\w.-]+\.(?:js|css))"', index):
        assert referenced in ASSETS


def test_files_are_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())

    assert "ui/*" in config["tool"]["setuptools"]["package-data"]["server"]
