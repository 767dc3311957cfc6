"""The benches' one way of building the engines they compare (`tests/bench/engines.py`)."""

import pytest

from inference_server.batcher import DynamicBatchingEngine
from inference_server.config import ModelConfig
from inference_server.continuous import ContinuousBatchingEngine
from tests.bench.engines import ADMISSIONS, DECODE_INLINE, continuous_variant, make_engine

MODEL = ModelConfig(path="unused-until-start", width=32, height=32, cpu_threads=1)


def test_request_level_variants() -> None:
    sequential = make_engine("sequential", MODEL)
    batching = make_engine("request-level", MODEL, max_batch=4, max_wait_ms=20.0)
    assert isinstance(sequential, DynamicBatchingEngine) and sequential.config.max_batch_size == 1
    assert isinstance(batching, DynamicBatchingEngine)
    assert (batching.config.max_batch_size, batching.config.max_wait_ms) == (4, 20.0)


@pytest.mark.parametrize("admission", ADMISSIONS)
def test_one_continuous_variant_per_admission_rule(admission: str) -> None:
    engine = make_engine(continuous_variant(admission), MODEL)
    assert isinstance(engine, ContinuousBatchingEngine)
    assert engine.config.admission == admission
    assert engine.decode_thread is not False


def test_the_decode_inline_ablation_and_unknown_names() -> None:
    assert make_engine(DECODE_INLINE, MODEL).decode_thread is False
    assert continuous_variant("always") == "continuous"
    for name in ("continuous eager", "batched"):
        with pytest.raises(ValueError, match="unknown engine variant"):
            make_engine(name, MODEL)
