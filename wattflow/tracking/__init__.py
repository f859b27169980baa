"""The MLflow adapter, in parts with one job each:

- `tracker`: `Tracker`, every write by explicit run id, journaled and offline-safe;
- `journal`: the write-ahead journal those writes go through (`wattflow.sync` replays it);
- `reachability`: whether MLflow can be reached, and the process-wide offline state;
- `exports`: a variant as an MLflow model, and a run's dataset input;
- `contract`: what every stage and variant run carries (`record_stage`, `record_evaluation`, ...).
"""

from wattflow.tracking.contract import (
    CACHE_TAG,
    STAGE_TAG,
    co2e_fields,
    energy_fields,
    log_energy,
    record_evaluation,
    record_ratios,
    record_result,
    record_stage,
)
from wattflow.tracking.journal import JOURNAL_NAME, Journal, mask_value
from wattflow.tracking.reachability import OfflineRunError, OfflineState, is_unreachable
from wattflow.tracking.tracker import (
    BATCH_LIMIT,
    OFFLINE_EXPERIMENT_PREFIX,
    OFFLINE_PREFIX,
    RUN_KEY_TAG,
    Tracker,
    flatten,
    metric_key,
)

__all__ = ["BATCH_LIMIT", "CACHE_TAG", "JOURNAL_NAME", "OFFLINE_EXPERIMENT_PREFIX", "OFFLINE_PREFIX", "RUN_KEY_TAG",
           "STAGE_TAG", "Journal", "OfflineRunError", "OfflineState", "Tracker", "co2e_fields", "energy_fields",
           "flatten", "is_unreachable", "log_energy", "mask_value", "metric_key", "record_evaluation",
           "record_ratios", "record_result", "record_stage"]
