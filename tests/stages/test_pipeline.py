from __future__ import annotations

import numpy as np

from qkdd.stages.pipeline import PipelineConfig, run_frame, synthetic_frame


def test_identical_secret_keys(rng: np.random.Generator) -> None:
    prep, det = synthetic_frame(rng, 1_000_000, detection_probability=0.2, qber=0.02)
    result = run_frame(prep, det, np.random.default_rng(1), np.random.default_rng(2))
    assert not result.aborted, result.reason
    assert result.secret_bits > 0
    assert np.array_equal(result.alice_key, result.bob_key)
    assert result.alice_key.size == result.secret_bits
    assert result.qber is not None and 0.015 < result.qber < 0.025
    assert result.disclosed_bits > 0


def test_eavesdropper_level_errors_abort_with_nothing(rng: np.random.Generator) -> None:
    prep, det = synthetic_frame(rng, 200_000, detection_probability=0.2, qber=0.25)
    result = run_frame(prep, det, np.random.default_rng(1), np.random.default_rng(2))
    assert result.aborted and result.secret_bits == 0
    assert result.alice_key.size == 0 and result.bob_key.size == 0
    assert result.reason is not None and "threshold" in result.reason


def test_small_frame_yields_no_key_but_no_error(rng: np.random.Generator) -> None:
    prep, det = synthetic_frame(rng, 20_000, detection_probability=0.2, qber=0.03)
    result = run_frame(
        prep, det, np.random.default_rng(1), np.random.default_rng(2), PipelineConfig(z_sample_fraction=0.05)
    )
    assert result.aborted and result.reason is not None and "no secret key" in result.reason


def test_frame_without_detections_aborts_cleanly(rng: np.random.Generator) -> None:
    prep, det = synthetic_frame(rng, 1000, detection_probability=0.0, qber=0.0)
    result = run_frame(prep, det, np.random.default_rng(1), np.random.default_rng(2))
    assert result.aborted and result.detections == 0 and result.secret_bits == 0
    assert result.reason is not None and "no Z-basis key bits" in result.reason
