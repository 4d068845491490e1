"""An independent client (kcat, librdkafka) reads what our producer wrote, and it matches the published schema."""

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
from kafka_fixtures import sample_generation, sample_vote

from alignloop.feedback.image_store import ImageStore
from alignloop.feedback.producer import EventProducer

SCHEMAS = Path(__file__).resolve().parents[1] / "deploy" / "schemas"


@pytest.mark.skipif(shutil.which("kcat") is None,
                    reason="kcat is not installed (Debian package kcat; .ci/run installs it)")
def test_kcat_consumes_events_valid_against_published_schemas(kafka_broker, kafka_topics, tmp_path):
    generation = sample_generation(ImageStore((tmp_path / "images").as_uri()), "req-kcat")
    feedback = sample_vote(generation)
    with EventProducer(kafka_broker.bootstrap, spool_dir=tmp_path / "spool-kcat", topics=kafka_topics) as producer:
        producer.emit(generation)
        producer.emit(feedback)
        assert producer.flush(30)
    for topic, event, schema_file in ((kafka_topics.generations, generation, "alignloop.generation-2.schema.json"),
                                      (kafka_topics.feedback, feedback, "alignloop.feedback-1.schema.json")):
        result = subprocess.run(
            ["kcat", "-C", "-b", kafka_broker.bootstrap, "-t", topic, "-o", "beginning", "-c", "1", "-e", "-q",
             "-f", "%k\\t%s\\n"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        key, value = result.stdout.rstrip("\n").split("\t", 1)
        document = json.loads(value)
        jsonschema.validate(document, json.loads((SCHEMAS / schema_file).read_text()),
                            format_checker=jsonschema.FormatChecker())
        assert key == event.kafka_key() and document["event_id"] == str(event.event_id)
