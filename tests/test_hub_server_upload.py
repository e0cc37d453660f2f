"""The loopback Hub's upload side, driven by the real huggingface_hub client: create_repo,
create_branch, upload_folder/create_commit with regular and LFS files (basic transfer), and
snapshot_download of what was pushed; atomic commits, failed uploads, tokens, private repos."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from tests.hub_server import GITATTRIBUTES, HubRepo, HubServer, use_hub

TOKEN = "hf_loopbackUPLOAD_0123456789abcdef"
REPO = "org/pushed"
TEXT = b'{"_class_name": "Tiny"}\n'
BIG = bytes(range(1, 256)) * 8  # 2040 bytes, no NUL byte: LFS only through the size threshold
CARD = b"---\ntags:\n- flashpack\n---\n# pushed\n"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer([], token=TOKEN) as server:
        server.lfs_threshold = 1024  # "large" from 1 KiB, so tiny files take the LFS path
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        yield server


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_bytes(TEXT)
    (root / "unet" / "weights.dat").write_bytes(BIG)
    (root / "README.md").write_bytes(CARD)
    return root


def api(server: HubServer, token: str | bool = TOKEN) -> HfApi:
    return HfApi(endpoint=server.endpoint, token=token)


def created(server: HubServer, private: bool = False) -> str:
    """Create REPO; returns its first commit (the one with .gitattributes)."""
    api(server).create_repo(REPO, private=private, exist_ok=True)
    return server.head(REPO)


def files_under(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def post(url: str, body: bytes, content_type: str = "application/json", token: str | None = TOKEN) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def put(url: str, body: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT")) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_a_folder_pushed_with_the_client_downloads_back_byte_identical(hub, folder, tmp_path):
    created(hub)
    commit = api(hub).upload_folder(repo_id=REPO, folder_path=folder).oid
    snap = snapshot_download(REPO, revision=commit, endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert files_under(Path(snap)) == {**files_under(folder), ".gitattributes": GITATTRIBUTES}


def test_small_files_go_in_the_commit_and_large_ones_by_one_lfs_put_each(hub, folder):
    created(hub)
    commit = api(hub).upload_folder(repo_id=REPO, folder_path=folder).oid
    repo = hub.repos[REPO]
    assert hub.count("cdn", "PUT") == 1
    assert repo.objects == {hashlib.sha256(BIG).hexdigest(): BIG}
    assert repo.lfs[commit] == {"unet/weights.dat"}
    assert hub.count("hub", "POST", f"/{REPO}.git/info/lfs/objects/verify") == 1


def test_the_upload_is_one_commit_on_main(hub, folder):
    first = created(hub)
    info = api(hub).upload_folder(repo_id=REPO, folder_path=folder, commit_message="push")
    repo = hub.repos[REPO]
    assert hub.head(REPO) == info.oid
    assert repo.parents[info.oid] == first and repo.parents[first] is None
    assert len(repo.commits) == 2
    assert hub.count("hub", "POST", f"/api/models/{REPO}/commit/main") == 1
    assert info.commit_url == f"{hub.endpoint}/{REPO}/commit/{info.oid}"


def test_an_upload_to_a_new_branch_leaves_main_as_it_was(hub, folder):
    first = created(hub)
    api(hub).create_branch(REPO, branch="flashpack")
    info = api(hub).upload_folder(repo_id=REPO, folder_path=folder, revision="flashpack")
    assert hub.head(REPO, "main") == first
    assert hub.files(REPO, "main") == {".gitattributes": GITATTRIBUTES}
    assert hub.head(REPO, "flashpack") == info.oid
    assert hub.repos[REPO].parents[info.oid] == first


def test_a_branch_that_exists_is_a_conflict_unless_exist_ok(hub):
    created(hub)
    api(hub).create_branch(REPO, branch="dev")
    with pytest.raises(HfHubHTTPError) as err:
        api(hub).create_branch(REPO, branch="dev")
    assert err.value.response.status_code == 409
    api(hub).create_branch(REPO, branch="dev", exist_ok=True)


def test_a_failed_lfs_upload_raises_and_main_does_not_move(hub, folder):
    first = created(hub)
    hub.fail_lfs_uploads(1, status=403)  # not retried by the client
    with pytest.raises(RuntimeError, match="Error while uploading 'unet/weights.dat' to the Hub") as err:
        api(hub).upload_folder(repo_id=REPO, folder_path=folder)
    assert isinstance(err.value.__cause__, HfHubHTTPError) and err.value.__cause__.response.status_code == 403
    assert hub.head(REPO) == first
    assert hub.count("hub", "POST", f"/api/models/{REPO}/commit/*") == 0
    assert hub.repos[REPO].objects == {}


def test_a_transient_500_on_an_lfs_put_is_retried_by_the_client(hub, folder):
    created(hub)
    hub.fail_lfs_uploads(1)
    commit = api(hub).upload_folder(repo_id=REPO, folder_path=folder).oid
    assert hub.count("cdn", "PUT") == 2
    assert hub.head(REPO) == commit and hub.files(REPO)["unet/weights.dat"] == BIG


def test_a_commit_naming_an_lfs_object_never_uploaded_is_refused_and_main_does_not_move(hub):
    first = created(hub)
    payload = b"".join(json.dumps(line).encode() + b"\n" for line in [
        {"key": "header", "value": {"summary": "dangling", "description": ""}},
        {"key": "file", "value": {"path": "a.txt", "content": base64.b64encode(b"a").decode(), "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}},
    ])
    status, body = post(f"{hub.endpoint}/api/models/{REPO}/commit/main", payload, "application/x-ndjson")
    assert status == 400 and b"Offending file: - w.bin" in body
    assert hub.head(REPO) == first and len(hub.repos[REPO].commits) == 1


def test_an_lfs_put_whose_sha256_differs_from_its_oid_is_refused_and_not_stored(hub):
    created(hub)
    oid = hashlib.sha256(BIG).hexdigest()
    status, body = post(f"{hub.endpoint}/{REPO}.git/info/lfs/objects/batch", json.dumps(
        {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(BIG)}]}).encode())
    assert status == 200
    batch = json.loads(body)
    assert batch["transfer"] == "basic"
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert put(href, BIG[:-1] + b"x") == 400
    assert hub.repos[REPO].objects == {}
    assert put(href, BIG) == 200
    assert hub.repos[REPO].objects == {oid: BIG}


def test_a_stale_parent_commit_is_refused(hub):
    first = created(hub)
    api(hub).create_commit(REPO, [CommitOperationAdd("a.txt", b"a")], commit_message="a")
    with pytest.raises(HfHubHTTPError) as err:
        api(hub).create_commit(REPO, [CommitOperationAdd("b.txt", b"b")], commit_message="b", parent_commit=first)
    assert err.value.response.status_code == 412
    assert set(hub.files(REPO)) == {".gitattributes", "a.txt"}


def test_pushing_the_same_folder_again_makes_no_commit_and_uploads_nothing(hub, folder):
    created(hub)
    commit = api(hub).upload_folder(repo_id=REPO, folder_path=folder).oid
    hub.reset_counts()
    assert api(hub).upload_folder(repo_id=REPO, folder_path=folder).oid == commit
    assert hub.count("cdn") == 0 and hub.count("hub", "POST", "*/commit/*") == 0


def test_a_deleted_file_is_gone_in_the_next_commit(hub, folder):
    created(hub)
    api(hub).upload_folder(repo_id=REPO, folder_path=folder)
    api(hub).delete_file("unet/weights.dat", REPO)
    assert set(hub.files(REPO)) == {".gitattributes", "model_index.json", "README.md"}


def test_creating_a_repo_without_the_token_gets_the_clients_401(hub):
    with pytest.raises(HfHubHTTPError) as err:
        api(hub, token=False).create_repo(REPO, exist_ok=True)
    assert err.value.response.status_code == 401
    assert REPO not in hub.repos


def test_uploading_to_a_public_repo_without_the_token_gets_a_401_and_main_does_not_move(hub, folder):
    first = created(hub)
    with pytest.raises(HfHubHTTPError) as err:
        api(hub, token=False).upload_folder(repo_id=REPO, folder_path=folder)
    assert err.value.response.status_code == 401
    assert hub.head(REPO) == first and hub.count("cdn") == 0


def test_creating_a_repo_that_exists_is_a_conflict_unless_exist_ok(hub):
    first = created(hub)
    with pytest.raises(HfHubHTTPError) as err:
        api(hub).create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api(hub).create_repo(REPO, exist_ok=True) == f"{hub.endpoint}/{REPO}"
    assert hub.head(REPO) == first and len(hub.repos[REPO].commits) == 1


def test_a_repo_created_private_is_not_readable_without_the_token(hub, tmp_path):
    created(hub, private=True)
    assert hub.repos[REPO].private is True
    with pytest.raises(RepositoryNotFoundError):
        api(hub, token=False).model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, endpoint=hub.endpoint, token=False, cache_dir=tmp_path / "cache")
    assert api(hub).model_info(REPO).private is True


def test_a_gated_repo_answers_gated_without_the_token(tmp_path, monkeypatch):
    repo = HubRepo("org/gated", gated=True)
    repo.push({"config.json": TEXT})
    with HubServer([repo], token=TOKEN) as server:
        use_hub(monkeypatch, server, tmp_path / "hf-home")
        with pytest.raises(GatedRepoError):
            api(server, token=False).model_info("org/gated")
        snap = snapshot_download("org/gated", endpoint=server.endpoint, token=TOKEN, cache_dir=tmp_path / "cache")
    assert files_under(Path(snap)) == {"config.json": TEXT}


def test_the_client_uploads_through_basic_lfs_not_xet(hub, folder):
    from huggingface_hub.utils._runtime import is_xet_available  # what _upload_files asks

    assert not is_xet_available()
    created(hub)
    api(hub).upload_folder(repo_id=REPO, folder_path=folder)
    assert hub.count(path_glob="*xet*") == 0 and hub.count("hub", "POST", "*/info/lfs/objects/batch") == 1
