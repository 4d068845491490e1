"""What the fine-tuning tests share (registered in tests/conftest.py's pytest_plugins): the bundled generator and
a snapshot of votes on images it drew, the input of `alignloop train rwr|kto|...`.

- `pipe` (module): the bundled tiny generator on CPU, fp32.
- `voted_snapshot(folder, pipe, prompts, adapter=None, tamper=False)`: a snapshot version with one alternating
  up/down vote per prompt; `SMALL_RUN`: the flags of a `train` command that runs in seconds.
"""

import json

import pytest

SMALL_RUN = ["--steps", "2", "--batch-size", "4", "--pretrain-batch-size", "4", "--sample-steps", "4",
             "--eval-prompts", "2", "--no-progress", "--json"]


@pytest.fixture(scope="module")
def pipe():
    from alignloop.models import load_generator

    return load_generator(device="cpu", dtype="fp32")


def voted_snapshot(folder, pipe, prompts, adapter=None, tamper=False):
    """A snapshot version (feedback/snapshot.py's layout) whose images were drawn by the bundled generator from the
    per-image seeds the rows record, as serving draws them; votes alternate up and down."""
    import uuid
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from alignloop.feedback.snapshot import VOTES_SCHEMA
    from alignloop.generation import generate

    out = folder / "v000001"
    (out / "images").mkdir(parents=True)
    seeds = list(range(100, 100 + len(prompts)))
    images = generate(pipe, prompts, seeds, 4, 5.0, output_type="uint8") if prompts else []
    rows = []
    for i, (prompt, seed, image) in enumerate(zip(prompts, seeds, images)):
        image_id = f"img-{i}-{uuid.uuid4().hex[:6]}"
        Image.fromarray(255 - image if tamper else image).save(out / "images" / f"{image_id}.png")
        rows.append({"event_id": str(uuid.uuid4()), "ts": datetime(2026, 11, 1, tzinfo=timezone.utc),
                     "request_id": f"r-{i}", "image_id": image_id, "vote": "up" if i % 2 == 0 else "down",
                     "user_hash": f"user-{i % 3}", "arm": "A", "adapter_version": adapter,
                     "image_uri": f"file:///store/{image_id}.png", "prompt": prompt, "n": 4, "k": 2, "steps": 4,
                     "guidance": 5.0, "seed": 7, "candidate_seed": seed, "rank": 1, "reward": 0.5,
                     "image_path": f"images/{image_id}.png", "label": int(i % 2 == 0)})
    pq.write_table(pa.Table.from_pylist(rows, schema=VOTES_SCHEMA), out / "votes.parquet")
    (out / "manifest.json").write_text(json.dumps({"version": 1, "offsets": {"alignloop.feedback": {"0": len(rows)}}}))
    return folder
