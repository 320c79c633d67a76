"""Moved to :mod:`nsa_lab.tracking.loss_by_position` (tracking must not import training);
this name stays for the code that still imports it from here."""

from nsa_lab.tracking.loss_by_position import (  # noqa: F401
    FIRST_BUCKET_DIVISOR,
    METRIC_PREFIX,
    PositionBucket,
    bucket_means,
    logged_losses_by_position,
    position_buckets,
    tokens_label,
)
