"""The operator commands, under their old names (each lives in `streams.commands`, one file a command)."""

from __future__ import annotations

from streams.commands.common import DEFAULT_TIMEOUT_SECONDS, FORMATS, UserError, _sibling  # noqa: F401
from streams.commands.produce import produce, read_events  # noqa: F401
from streams.commands.reembed import ReembedReport, document_text, model_short_name, reembed  # noqa: F401
from streams.commands.search import format_hits, search  # noqa: F401
from streams.commands.status import PartitionStatus, WorkerStatus, format_status, partition_offsets, status, worker_metrics  # noqa: F401
