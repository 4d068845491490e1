"""Image store: durable local writes, any fsspec URL, no reads outside the store."""

import pytest

from alignloop.feedback.image_store import PNG_MAGIC, ImageStore

PNG = PNG_MAGIC + b"rest-of-a-png"


def test_put_get_on_local_files(tmp_path):
    store = ImageStore((tmp_path / "images").as_uri())
    uri = store.put("img-abc", PNG)
    assert uri == store.uri("img-abc") and uri.startswith("file://")
    assert store.get(uri) == PNG and store.exists(uri)
    assert (tmp_path / "images" / "im" / "img-abc.png").read_bytes() == PNG
    assert not list((tmp_path / "images").rglob(".*"))  # no temp files left behind


def test_put_get_on_another_fsspec_backend():
    store = ImageStore("memory://alignloop-test-images")
    assert store.get(store.put("img-1", PNG)) == PNG


def test_rejects_non_png_bad_ids_and_foreign_uris(tmp_path):
    store = ImageStore(tmp_path.as_uri())
    with pytest.raises(ValueError, match="not a PNG"):
        store.put("img-1", b"GIF89a")
    with pytest.raises(ValueError, match="image_id"):
        store.put("../escape", PNG)
    with pytest.raises(ValueError, match="not inside the image store"):
        store.get("file:///etc/passwd")
    with pytest.raises(ValueError, match="not inside the image store"):
        store.get(store.url + "/../secret.png")


def test_a_new_fan_out_folder_is_made_durable_in_its_parent(tmp_path, monkeypatch):
    # The PNG is fsync'd into its two-character folder; a folder made for it must be fsync'd into the store's
    # root too, or a power loss can drop the folder, and every image in it, after put() returned.
    import alignloop.durable as durable

    synced = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda path: synced.append(path) or real(path))
    root = tmp_path / "images"
    store = ImageStore(root.as_uri())
    assert synced == [tmp_path]  # the store's own folder, made on open
    synced.clear()
    store.put("ab-1", PNG)
    assert synced == [root, root / "ab"]  # the new folder's entry, then the file's
    synced.clear()
    store.put("ab-2", PNG)
    assert synced == [root / "ab"]  # an existing folder: only the file's entry
    (root / "cd").write_bytes(b"a file where a folder belongs")
    with pytest.raises(OSError):
        store.put("cd-1", PNG)
