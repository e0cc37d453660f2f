"""GET /playground and the offline /docs and /redoc (serving/playground.py) through fal's own FastAPI app,
without a model (no setup()): what the pages reference, and that it is all served by the app. The page
driven in a real browser: test_playground_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from starlette.testclient import TestClient

from serving import playground

EXTERNAL = re.compile(r"""(?:https?:)?//[^\s"'<>]+""")


class References(HTMLParser):
    """Every src= and href= of a page, and its inline scripts and styles."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._tag: str | None = None

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in {"src", "href"} and value]
        self._tag = tag

    def handle_data(self, data):
        if self._tag in {"script", "style"}:
            self.inline.append(data)


def references(html: str) -> References:
    parser = References()
    parser.feed(html)
    return parser


@pytest.fixture(scope="module")
def client(app_module):
    return TestClient(app_module.TextToImageApp(_allow_init=True)._build_app())  # no lifespan: no setup()


def test_the_playground_is_one_self_contained_page(client):
    response = client.get("/playground")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = references(response.text)
    assert all(url.startswith("data:") or not EXTERNAL.match(url) for url in page.urls), page.urls
    assert not [url for url in page.urls if url.startswith("/")]  # relative: it works under a root path
    code = "".join(page.inline)
    assert not EXTERNAL.findall(code.replace("http://www.w3.org", ""))  # no CDN, no import from elsewhere
    assert "openapi.json" in code and "x-fal-request-id" in code


def test_the_playground_and_the_docs_assets_stay_out_of_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/playground" not in paths and not [path for path in paths if path.startswith("/docs")]


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_pages_reference_no_external_url_and_their_assets_are_served(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert not EXTERNAL.findall(response.text), EXTERNAL.findall(response.text)
    urls = references(response.text).urls
    assert len(urls) >= 2 and all(url.startswith(f"{playground.DOCS_ASSETS_PATH}/") for url in urls), urls
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert "/openapi.json" in response.text


def test_swagger_ui_gets_its_css_and_js_from_the_app_and_no_validator(client):
    html = client.get("/docs").text
    assert f'href="{playground.DOCS_ASSETS_PATH}/swagger-ui.css"' in html
    assert f'src="{playground.DOCS_ASSETS_PATH}/swagger-ui-bundle.js"' in html
    assert '"validatorUrl": null' in html
    css = client.get(f"{playground.DOCS_ASSETS_PATH}/swagger-ui.css")
    assert css.headers["content-type"].startswith("text/css")
    assert client.get("/docs/oauth2-redirect").status_code == 200  # FastAPI's own, kept


def test_redoc_refuses_images_from_elsewhere(client):
    # ReDoc's sidebar logo is an <img> on Redocly's CDN: the browser is told not to fetch it.
    assert client.get("/redoc").headers["content-security-policy"] == "img-src 'self' data: blob:"


def test_the_pages_follow_the_root_path_fal_serves_the_app_under(app_module, monkeypatch):
    monkeypatch.setenv("FAL_APP_ROOT_PATH", "/owner/app")
    app = app_module.TextToImageApp(_allow_init=True)._build_app()
    html = TestClient(app, root_path="/owner/app").get("/docs").text
    assert 'href="/owner/app/docs/assets/swagger-ui.css"' in html and "url: '/owner/app/openapi.json'" in html


def test_every_serving_app_has_the_playground_and_offline_docs(tmp_path, monkeypatch):
    monkeypatch.setenv("APP_DATA_ROOT", str(tmp_path))
    import module_app

    client = TestClient(module_app.LatentDecoderApp(_allow_init=True)._build_app())
    assert client.get("/playground").status_code == 200  # the page says what this app lacks
    assert not EXTERNAL.findall(client.get("/docs").text)


def test_without_fastapi_offline_the_docs_stay_fastapis_own(app_module, monkeypatch):
    monkeypatch.setattr(playground, "docs_assets", lambda: None)
    client = TestClient(app_module.TextToImageApp(_allow_init=True)._build_app())
    assert "cdn.jsdelivr.net" in client.get("/docs").text
    assert client.get("/playground").status_code == 200


def test_the_installed_fastapi_offline_ships_the_four_files():
    assert playground.docs_assets() is not None


def test_the_condition_rows_read_the_schemas_controlnets_and_ip_adapter(client):
    # What the page's ControlNet and IP-Adapter rows read (the browser test drives them): a row per
    # field, shown where the endpoint's input has it; the demo profile configures one ControlNet only.
    html = client.get("/playground").text
    assert 'data-field="controlnets"' in html and 'data-field="ip_adapter"' in html
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("TextToImageInput", "ImageToImageInput", "InpaintInput"):
        properties = schemas[name]["properties"]
        assert properties["controlnets"]["items"] == {"$ref": "#/components/schemas/ControlNetInput"}, name
        assert "ip_adapter" not in properties, name
    control = schemas["ControlNetInput"]["properties"]
    assert control["path"]["enum"] == ["demo-controlnet"] and "image_url" in control
    scale = control["conditioning_scale"]
    assert (scale["type"], scale["minimum"], scale["maximum"], scale["default"]) == ("number", 0, 2, 1)
